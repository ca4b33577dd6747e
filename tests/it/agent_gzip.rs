//! `/metrics` is gzip-compressed when the client asks: through the router
//! in-process, and with a real Prometheus scraping the real agent (fake GPU
//! backend) through a recording proxy that shows the compressed exchange.
// Integration tests start the real binaries; only the product is held to the
// no-spawn-outside-exec.rs rule.
#![allow(clippy::disallowed_methods)]

use crate::support::{free_port, wait_listening, Proc};
use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use gpuops::collector::{self, kmsg, Context, KernelEvents, Runner};
use gpuops::config::agent::GpuBackendChoice;
use gpuops::config::AgentConfig;
use gpuops::exporter::{self, AgentState};
use gpuops::telemetry::HttpMetrics;
use http_body_util::BodyExt as _;
use tower::ServiceExt as _;

fn gpu_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpu")
}

fn training_state() -> Arc<AgentState> {
    let fx = gpu_fixtures();
    let mut cfg = AgentConfig::default();
    cfg.collectors.cpu = false;
    cfg.collectors.memory = false;
    cfg.collectors.oom = false;
    cfg.collectors.storage = false;
    cfg.gpu.backend = GpuBackendChoice::Fake(fx.join("h100x8-training.json"));
    cfg.roots.procfs = fx.join("proc");
    cfg.roots.rootfs = fx.join("root");
    cfg.roots.kmsg = fx.join("kmsg-xid.txt");
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

/// `(status, content-encoding, body bytes)` of `GET /metrics`.
async fn scrape(state: &Arc<AgentState>, accept: Option<&str>) -> (StatusCode, String, Vec<u8>) {
    let mut req = Request::get("/metrics");
    if let Some(a) = accept {
        req = req.header(header::ACCEPT_ENCODING, a);
    }
    let resp = exporter::router(state.clone())
        .oneshot(req.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let enc = resp
        .headers()
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = resp
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    (status, enc, body)
}

fn gunzip(bytes: &[u8]) -> String {
    let mut out = String::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_string(&mut out)
        .expect("valid gzip");
    out
}

/// The exposition without the lines that differ between two scrapes.
fn steady(text: &str) -> Vec<&str> {
    text.lines()
        .filter(|l| l.starts_with("gpu_") && !l.contains("_seconds"))
        .collect()
}

#[tokio::test]
async fn metrics_are_gzipped_when_asked_and_plain_otherwise() {
    let s = training_state();
    let (status, enc, plain) = scrape(&s, None).await;
    assert_eq!((status, enc.as_str()), (StatusCode::OK, ""));
    let plain = String::from_utf8(plain).unwrap();
    assert!(plain.contains("gpu_sm_active_percent{gpu=\"0\""));

    let (status, enc, gz) = scrape(&s, Some("gzip")).await;
    assert_eq!((status, enc.as_str()), (StatusCode::OK, "gzip"));
    let text = gunzip(&gz);
    assert_eq!(steady(&text), steady(&plain));
    assert!(
        gz.len() * 8 < plain.len(),
        "gzip {} vs plain {} bytes",
        gz.len(),
        plain.len()
    );
    // Prometheus's own header, with preferences.
    let (_, enc, _) = scrape(&s, Some("gzip;q=1.0, identity;q=0.5, *;q=0")).await;
    assert_eq!(enc, "gzip");
    // A client that cannot take gzip gets plain text.
    let (_, enc, body) = scrape(&s, Some("identity")).await;
    assert_eq!(enc, "");
    assert!(String::from_utf8(body).is_ok());
}

/// What went through the proxy: requests and responses, the first 64 KiB of each direction.
#[derive(Default)]
struct Recorded {
    requests: Vec<u8>,
    responses: Vec<u8>,
}

/// A loopback TCP proxy to `upstream` that records the first bytes of each
/// direction; it stops accepting after `until`.
fn recording_proxy(upstream: String, until: Instant) -> (String, Arc<Mutex<Recorded>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    listener.set_nonblocking(true).unwrap();
    let rec = Arc::new(Mutex::new(Recorded::default()));
    let r = rec.clone();
    std::thread::spawn(move || {
        while Instant::now() < until {
            let Ok((client, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            };
            let _ = client.set_nonblocking(false);
            let Ok(server) = TcpStream::connect(&upstream) else {
                continue;
            };
            for (mut from, mut to, requests) in [
                (
                    client.try_clone().unwrap(),
                    server.try_clone().unwrap(),
                    true,
                ),
                (server, client, false),
            ] {
                let r = r.clone();
                std::thread::spawn(move || {
                    let _ = from.set_read_timeout(Some(Duration::from_secs(60)));
                    let mut buf = [0u8; 16 * 1024];
                    while let Ok(n) = from.read(&mut buf) {
                        if n == 0 || to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        let mut g = r.lock().unwrap();
                        let log = if requests {
                            &mut g.requests
                        } else {
                            &mut g.responses
                        };
                        let room = (64 * 1024usize).saturating_sub(log.len());
                        log.extend_from_slice(&buf[..n.min(room)]);
                    }
                    let _ = to.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
    (addr, rec)
}

async fn query(client: &reqwest::Client, prom: &str, q: &str) -> Vec<serde_json::Value> {
    let Ok(resp) = client
        .get(format!("{prom}/api/v1/query"))
        .query(&[("query", q)])
        .send()
        .await
    else {
        return Vec::new();
    };
    let v: serde_json::Value = resp.json().await.unwrap_or_default();
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs prometheus; run by .ci/run"]
async fn prometheus_scrapes_the_agent_with_gzip() {
    let dir = tempfile::tempdir().unwrap();
    let fx = gpu_fixtures();
    std::fs::write(
        dir.path().join("agent.toml"),
        "[collectors]\ncpu = false\nmemory = false\noom = false\nstorage = false\n[gpu]\ngpm_interval_secs = 1\ngpm_window_secs = 0.2\n",
    )
    .unwrap();
    let agent_addr = format!("127.0.0.1:{}", free_port());
    let _agent = Proc(
        Command::new(env!("CARGO_BIN_EXE_gpuops"))
            .arg("agent")
            .arg("--config")
            .arg(dir.path().join("agent.toml"))
            .arg("--listen")
            .arg(&agent_addr)
            .arg("--gpu-fake")
            .arg(fx.join("h100x8-training.json"))
            .arg("--procfs")
            .arg(fx.join("proc"))
            .arg("--rootfs")
            .arg(fx.join("root"))
            .arg("--kmsg")
            .arg(fx.join("kmsg-xid.txt"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start gpuops agent"),
    );
    wait_listening(&agent_addr, "agent");
    let until = Instant::now() + Duration::from_secs(60);
    let (proxy, recorded) = recording_proxy(agent_addr, until);

    let prom_addr = format!("127.0.0.1:{}", free_port());
    std::fs::write(
        dir.path().join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: gpuops\n    static_configs:\n      - targets: [\"{proxy}\"]\n"
        ),
    )
    .unwrap();
    let _prom = Proc(
        Command::new("/usr/bin/prometheus")
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={prom_addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start /usr/bin/prometheus"),
    );
    wait_listening(&prom_addr, "prometheus");
    let prom = format!("http://{prom_addr}");
    let client = reqwest::Client::new();
    let mut up = Vec::new();
    let mut sm = Vec::new();
    while Instant::now() < until {
        up = query(&client, &prom, "up{job=\"gpuops\"}").await;
        sm = query(&client, &prom, "gpu_sm_active_percent{gpu=\"0\"}").await;
        if up.first().and_then(|r| r["value"][1].as_str()) == Some("1") && !sm.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        up.first().and_then(|r| r["value"][1].as_str()),
        Some("1"),
        "up: {up:?}"
    );
    assert_eq!(
        sm.first().and_then(|r| r["value"][1].as_str()),
        Some("96.2"),
        "gpu_sm_active_percent: {sm:?}"
    );
    let workloads = query(
        &client,
        &prom,
        "gpu_workload_memory_used_bytes{workload_type=\"slurm\",workload=\"8123\",user=\"alice\"}",
    )
    .await;
    assert_eq!(workloads.len(), 4, "{workloads:?}");
    // What crossed the wire: Prometheus asked for gzip and got it.
    let rec = recorded.lock().unwrap();
    let requests = String::from_utf8_lossy(&rec.requests).to_ascii_lowercase();
    let responses = String::from_utf8_lossy(&rec.responses).to_ascii_lowercase();
    assert!(requests.contains("accept-encoding: gzip"), "{requests}");
    assert!(
        responses.contains("content-encoding: gzip"),
        "{}",
        &responses[..responses.len().min(600)]
    );
}
