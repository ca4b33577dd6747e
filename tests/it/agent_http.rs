//! The agent's HTTP surface: the router in-process (`/metrics`, `/healthz`,
//! `/readyz`, `/v1/events`), and the real `gpuops agent` binary on loopback
//! following a kernel-log file that the test appends to.
#![allow(clippy::disallowed_methods)] // integration tests spawn the real binary and external tools

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use gpuops::collector::{self, kmsg, Context, KernelEvents, Runner};
use gpuops::config::AgentConfig;
use gpuops::exporter::{self, AgentState};
use gpuops::telemetry::HttpMetrics;
use http_body_util::BodyExt as _;
use tower::ServiceExt as _;

use crate::support::http_get;

fn fixture(scenario: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/host")
        .join(scenario)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A host tree that booted 100 s ago with a kernel log of recent events:
/// an OOM kill 50 s ago and an I/O error 10 s ago.
fn recent_host(dir: &Path) -> AgentConfig {
    let full = fixture("full");
    let proc_dir = dir.join("proc");
    std::fs::create_dir_all(&proc_dir).unwrap();
    let stat = std::fs::read_to_string(full.join("proc/stat"))
        .unwrap()
        .replace("btime 1700000000", &format!("btime {}", now() - 100));
    std::fs::write(proc_dir.join("stat"), stat).unwrap();
    for f in ["meminfo", "vmstat", "loadavg"] {
        std::fs::copy(full.join("proc").join(f), proc_dir.join(f)).unwrap();
    }
    std::fs::write(
        dir.join("kmsg"),
        "3,1,50000000,-;Out of memory: Killed process 77 (trainer) total-vm:10kB, anon-rss:5kB, file-rss:0kB\n\
         3,2,90000000,-;I/O error, dev nvme1n1, sector 8 op 0x1:(WRITE) flags 0x800 phys_seg 1 prio class 2\n",
    )
    .unwrap();
    let mut cfg = AgentConfig::default();
    cfg.roots.procfs = proc_dir;
    cfg.roots.sysfs = dir.join("sys");
    cfg.roots.rootfs = dir.join("root");
    cfg.roots.kmsg = dir.join("kmsg");
    cfg.collectors.gpu = false;
    cfg
}

fn state(cfg: AgentConfig) -> Arc<AgentState> {
    let cfg = Arc::new(cfg);
    let events = Arc::new(KernelEvents::new());
    kmsg::read_once(&cfg.roots, &events);
    let ctx = Arc::new(Context::new(cfg, events.clone(), false));
    let collectors = collector::all(&ctx);
    Arc::new(AgentState {
        runner: Arc::new(Runner::new(ctx, collectors)),
        events,
        http: Arc::new(HttpMetrics::new()),
    })
}

async fn get(state: &Arc<AgentState>, uri: &str) -> (StatusCode, String, String) {
    let resp = exporter::router(state.clone())
        .oneshot(Request::get(uri).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let ctype = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, ctype, String::from_utf8_lossy(&body).into_owned())
}

/// A host collector that records the thread each run happened on.
struct WhereRun(std::sync::Mutex<Vec<std::thread::ThreadId>>);

impl collector::Collector for WhereRun {
    fn name(&self) -> &'static str {
        "where"
    }

    fn collect(&self, _ctx: &Context, _sink: &mut collector::Sink) -> Result<(), collector::Error> {
        self.0.lock().unwrap().push(std::thread::current().id());
        Ok(())
    }

    fn may_block(&self) -> bool {
        false
    }
}

/// Host collectors are served on the request's own thread: no hand-off to
/// the blocking pool and back (most of a scrape's time on a busy node).
#[tokio::test]
async fn host_scrape_runs_on_the_request_thread_without_a_hand_off() {
    let ctx = Arc::new(Context::new(
        Arc::new(AgentConfig::default()),
        Arc::new(KernelEvents::new()),
        false,
    ));
    let probe = Arc::new(WhereRun(std::sync::Mutex::new(Vec::new())));
    let s = Arc::new(AgentState {
        runner: Arc::new(Runner::new(ctx, vec![probe.clone()])),
        events: Arc::new(KernelEvents::new()),
        http: Arc::new(HttpMetrics::new()),
    });
    for _ in 0..3 {
        let (status, _, body) = get(&s, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            body.contains("gpuops_collector_success{collector=\"where\"} 1"),
            "{body}"
        );
    }
    let me = std::thread::current().id();
    assert_eq!(*probe.0.lock().unwrap(), vec![me; 3]);
}

#[tokio::test]
async fn readyz_turns_ready_after_the_first_collection() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(recent_host(dir.path()));
    let (status, _, body) = get(&s, "/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let (status, _, body) = get(&s, "/healthz").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "ok\n"));
    let (status, _, _) = get(&s, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, body) = get(&s, "/readyz").await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn metrics_is_prometheus_text_with_host_and_self_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(recent_host(dir.path()));
    let (status, ctype, body) = get(&s, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(ctype, "text/plain; version=0.0.4; charset=utf-8");
    for line in [
        "# TYPE memory_total_bytes gauge",
        "memory_total_bytes 67108864000",
        "oom_kills_total 5",
        "cpu_seconds_total{mode=\"user\"} 400",
        "gpuops_collector_success{collector=\"memory\"} 1",
        "gpuops_kernel_log_readable 1",
        "# TYPE process_resident_memory_bytes gauge",
    ] {
        assert!(body.lines().any(|l| l == line), "{line:?} missing:\n{body}");
    }
    // The request itself is counted on the next scrape.
    let (_, _, body) = get(&s, "/metrics").await;
    assert!(
        body.contains(
            "api_requests_total{endpoint=\"/metrics\",method=\"GET\",status_code=\"200\"}"
        ),
        "{body}"
    );
}

#[tokio::test]
async fn events_since_filters_by_age_and_rejects_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(recent_host(dir.path()));
    let events = |body: &str| -> Vec<serde_json::Value> {
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        v["events"].as_array().cloned().unwrap_or_default()
    };
    let (status, ctype, body) = get(&s, "/v1/events").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(ctype, "application/json");
    let all = events(&body);
    assert_eq!(all.len(), 2, "{body}");
    assert_eq!(all[0]["type"], "oom_kill");
    assert_eq!(all[0]["pid"], 77);
    assert_eq!(all[0]["process"], "trainer");
    assert_eq!(all[0]["counted"], true);
    assert_eq!(all[1]["type"], "io_error");
    assert_eq!(all[1]["device"], "nvme1n1");

    // The OOM kill was 50 s ago, the I/O error 10 s ago.
    let (_, _, body) = get(&s, "/v1/events?since=30").await;
    let recent = events(&body);
    assert_eq!(recent.len(), 1, "{body}");
    assert_eq!(recent[0]["type"], "io_error");
    // A Unix timestamp works too.
    let (_, _, body) = get(&s, &format!("/v1/events?since={}", now() - 70)).await;
    assert_eq!(events(&body).len(), 2, "{body}");

    for bad in ["-1", "abc", "NaN", "inf"] {
        let (status, _, body) = get(&s, &format!("/v1/events?since={bad}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "since={bad}: {body}");
        assert!(body.contains("since"), "{body}");
    }
}

/// Minimal HTTP/1.1 GET over loopback (the test must not depend on a client crate).
struct Agent(std::process::Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn agent_binary_serves_and_follows_the_kernel_log() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = recent_host(dir.path());
    let toml = dir.path().join("agent.toml");
    std::fs::write(&toml, "[collectors]\ngpu = false\n").unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_gpuops"))
        .current_dir(dir.path())
        .env_remove("GPUOPS_AGENT_CONFIG")
        .args([
            "agent",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--config",
        ])
        .arg(&toml)
        .arg("--procfs")
        .arg(&cfg.roots.procfs)
        .arg("--sysfs")
        .arg(&cfg.roots.sysfs)
        .arg("--rootfs")
        .arg(&cfg.roots.rootfs)
        .arg("--kmsg")
        .arg(&cfg.roots.kmsg)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let _agent = Agent(child);

    let until = Instant::now() + Duration::from_secs(20);
    let ready = loop {
        match http_get(port, "/readyz") {
            Ok((200, _)) => break true,
            _ if Instant::now() > until => break false,
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    assert!(ready, "agent never became ready on port {port}");
    let (status, body) = http_get(port, "/metrics").unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("memory_total_bytes 67108864000"), "{body}");
    assert!(
        body.contains("storage_errors_total{device=\"nvme1n1\",source=\"kmsg\"} 1"),
        "{body}"
    );

    // A record appended while the agent runs is picked up (regular files are followed).
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&cfg.roots.kmsg)
        .unwrap();
    writeln!(
        f,
        "3,3,95000000,-;I/O error, dev nvme1n1, sector 16 op 0x0:(READ) flags 0x0 phys_seg 1 prio class 2"
    )
    .unwrap();
    drop(f);
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = http_get(port, "/metrics").unwrap();
        if body.contains("storage_errors_total{device=\"nvme1n1\",source=\"kmsg\"} 2") {
            break;
        }
        assert!(
            Instant::now() < until,
            "appended record not counted:\n{body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (status, body) = http_get(port, "/v1/events?since=3600").unwrap();
    assert_eq!(status, 200);
    assert_eq!(body.matches("\"io_error\"").count(), 2, "{body}");
}

/// `mount` / `umount` of a small tmpfs at `dir` (needs root).
fn mount_tmpfs(dir: &Path, mount: bool) {
    let st = if mount {
        std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "gpuops-test"])
            .arg(dir)
            .status()
    } else {
        std::process::Command::new("umount").arg(dir).status()
    };
    assert!(
        st.is_ok_and(|s| s.success()),
        "{} {}: needs root",
        if mount { "mount" } else { "umount" },
        dir.display()
    );
}

/// The storage collector reads mountinfo again only when the kernel flags
/// it (or every 30 s): a mount added or removed on the real host must still
/// show at the very next scrape, never a removed mount's mount point with
/// its parent filesystem's figures.
#[tokio::test]
#[ignore = "needs root to mount a tmpfs: run by .ci/run"]
async fn a_mount_added_or_removed_shows_at_the_next_scrape() {
    let dir = tempfile::tempdir().unwrap();
    let point = dir.path().join("mnt");
    std::fs::create_dir(&point).unwrap();
    let mut cfg = AgentConfig::default();
    cfg.collectors.gpu = false;
    cfg.storage.mount_include = Some(
        regex::Regex::new(&format!(
            "^{}$",
            regex::escape(&point.display().to_string())
        ))
        .unwrap(),
    );
    cfg.storage.fs_type_exclude = Vec::new();
    let s = state(cfg);
    let series = format!("mountpoint=\"{}\"", point.display());
    let (_, _, body) = get(&s, "/metrics").await;
    assert!(!body.contains(&series), "not mounted yet:\n{body}");

    mount_tmpfs(&point, true);
    let (_, _, body) = get(&s, "/metrics").await;
    let mounted = body.contains(&series) && body.contains("gpuops-test");
    mount_tmpfs(&point, false);
    assert!(
        mounted,
        "the new mount is missing from the next scrape:\n{body}"
    );
    let (_, _, body) = get(&s, "/metrics").await;
    assert!(
        !body.contains(&series),
        "the removed mount is still exported:\n{body}"
    );
}
