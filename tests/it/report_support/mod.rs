//! A day of known fleet history in OpenMetrics text, backfilled into a real
//! Prometheus (`promtool tsdb create-blocks-from openmetrics`), for the
//! report tests, the README's example chart and the benchmark.
#![allow(clippy::disallowed_methods)] // starts promtool and prometheus
#![allow(dead_code)]

pub use crate::support::free_port;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The end of the small fleet's day: 2025-11-28T08:00:00Z (a whole hour).
pub const AT: i64 = 1_764_316_800;
pub const DAY: i64 = 86_400;
pub const HOUR: i64 = 3600;

pub const NODE_A: &str = "10.0.0.1:9949";
pub const NODE_B: &str = "10.0.0.2:9949";
pub const NODE_C: &str = "10.0.0.3:9949";

/// Series name + labels -> samples `(unix seconds, value)`, in time order.
#[derive(Default)]
pub struct History {
    series: BTreeMap<(String, String), Vec<(i64, f64)>>,
}

impl History {
    pub fn push(&mut self, name: &str, labels: &[(&str, &str)], t: i64, v: f64) {
        let mut l = String::new();
        for (i, (k, val)) in labels.iter().enumerate() {
            if i > 0 {
                l.push(',');
            }
            let _ = write!(l, "{k}=\"{val}\"");
        }
        self.series
            .entry((name.to_string(), l))
            .or_default()
            .push((t, v));
    }

    /// OpenMetrics text: families contiguous, samples in time order.
    pub fn write_openmetrics(&self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        let mut w = std::io::BufWriter::new(out);
        for ((name, labels), samples) in &self.series {
            for (t, v) in samples {
                writeln!(w, "{name}{{{labels}}} {v} {t}")?;
            }
        }
        writeln!(w, "# EOF")?;
        w.flush()
    }
}

/// The small fleet's day, ending at [`AT`], one sample a minute:
/// - node A (4 GPUs): GPU 0 under 5 % from +2h to +7h (5 idle hours),
///   GPU 1 idle all day (24), XID 48 twice on GPU 2 (+10h, +12h), 3 OOM
///   kills, `/data` filling at 1 MB a minute with 3.6 GB free at the end
///   (2.5 days to full, 82 % used).
/// - node B (2 GPUs): GPU 1 idle for the first 4 hours, then falls off the
///   bus at +20h (XID 79, its series stop, gpu_devices 2 -> 1).
/// - node C (2 GPUs): stops reporting at +16h.
///
/// Expected: 2 nodes now of 3, node C stopped, node B 1 GPU fewer, XIDs
/// {48: 2, 79: 1}, idle GPU-hours A 29, B 4 (33), `/data` 2.5 days.
pub fn small_fleet() -> History {
    let start = AT - DAY;
    let mut h = History::default();
    let mut t = start;
    while t <= AT {
        let rel = t - start;
        for (node, gpus, until) in [
            (NODE_A, 4, AT),
            (NODE_B, 2, AT),
            (NODE_C, 2, start + 16 * HOUR),
        ] {
            if t > until {
                continue;
            }
            let base = [("instance", node), ("job", "gpuops-agent")];
            h.push(
                "gpuops_build_info",
                &[base[0], base[1], ("role", "agent"), ("version", "0.1.0")],
                t,
                1.0,
            );
            let fell_off = node == NODE_B && rel > 20 * HOUR;
            h.push(
                "gpu_devices",
                &base,
                t,
                if fell_off { 1.0 } else { gpus as f64 },
            );
            for g in 0..gpus {
                if fell_off && g == 1 {
                    continue;
                }
                let gs = g.to_string();
                let l = [base[0], base[1], ("gpu", gs.as_str())];
                let idle = (node == NODE_A && g == 0 && rel > 2 * HOUR && rel <= 7 * HOUR)
                    || (node == NODE_A && g == 1)
                    || (node == NODE_B && g == 1 && rel <= 4 * HOUR);
                h.push(
                    "gpu_utilization_percent",
                    &l,
                    t,
                    if idle { 2.0 } else { 60.0 },
                );
                h.push("gpu_memory_used_bytes", &l, t, 40e9);
                h.push("gpu_memory_total_bytes", &l, t, 80e9);
            }
            if node == NODE_A {
                let xid = if rel >= 12 * HOUR { 2.0 } else { 1.0 };
                if rel >= 10 * HOUR {
                    h.push(
                        "gpu_xid_errors_total",
                        &[base[0], base[1], ("gpu", "2"), ("xid", "48")],
                        t,
                        xid,
                    );
                }
                let oom = match rel {
                    r if r >= 15 * HOUR => 3.0,
                    r if r >= 5 * HOUR => 1.0,
                    _ => 0.0,
                };
                h.push("oom_kills_total", &base, t, oom);
                let fs = [
                    base[0],
                    base[1],
                    ("mountpoint", "/data"),
                    ("device", "/dev/md0"),
                    ("fstype", "xfs"),
                ];
                let used = 14.96e9 + (rel / 60) as f64 * 1e6;
                h.push("storage_used_bytes", &fs, t, used);
                h.push("storage_total_bytes", &fs, t, 20e9);
                h.push("storage_readonly", &fs, t, 0.0);
            }
            if node == NODE_B && rel >= 20 * HOUR {
                h.push(
                    "gpu_xid_errors_total",
                    &[base[0], base[1], ("gpu", "1"), ("xid", "79")],
                    t,
                    1.0,
                );
            }
        }
        t += 60;
    }
    h
}

/// A large fleet: `nodes` × `gpus` GPUs, utilization and memory only (the
/// heaviest series), one sample every `step` seconds for the day ending at
/// [`AT`]; every 10th node's GPU 0 idle all day; every 100th node (from
/// the 50th) stops reporting at noon.
pub fn large_fleet(
    nodes: usize,
    gpus: usize,
    step: i64,
    out: &mut impl std::io::Write,
) -> std::io::Result<()> {
    let mut w = std::io::BufWriter::new(out);
    let start = AT - DAY;
    let names = [
        "gpu_utilization_percent",
        "gpu_memory_used_bytes",
        "gpu_memory_total_bytes",
    ];
    for (k, name) in names.iter().enumerate() {
        for n in 0..nodes {
            let node = format!("10.1.{}.{}:9949", n / 250, n % 250);
            let until = if n % 100 == 50 { start + DAY / 2 } else { AT };
            for g in 0..gpus {
                let mut t = start;
                while t <= until {
                    let v = match k {
                        0 if n % 10 == 0 && g == 0 => 1.0,
                        0 => ((t / step + (n * gpus + g) as i64) % 90 + 10) as f64,
                        1 => 40e9,
                        _ => 80e9,
                    };
                    writeln!(
                        w,
                        "{name}{{instance=\"{node}\",job=\"gpuops-agent\",gpu=\"{g}\"}} {v} {t}"
                    )?;
                    t += step;
                }
            }
        }
    }
    for n in 0..nodes {
        let node = format!("10.1.{}.{}:9949", n / 250, n % 250);
        let until = if n % 100 == 50 { start + DAY / 2 } else { AT };
        let mut t = start;
        while t <= until {
            writeln!(w, "gpuops_build_info{{instance=\"{node}\",job=\"gpuops-agent\",role=\"agent\"}} 1 {t}")?;
            t += step;
        }
    }
    writeln!(w, "# EOF")?;
    w.flush()
}

/// A running Prometheus over a backfilled TSDB; killed on drop.
pub struct Prometheus {
    child: Child,
    pub url: String,
    pub dir: PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Backfills `openmetrics` (a file) into `dir/tsdb` with promtool and starts
/// Prometheus on it. Panics (the test fails, never skips) when promtool or
/// prometheus is missing.
pub fn backfill_and_start(openmetrics: &Path, dir: &Path) -> Prometheus {
    let tsdb = dir.join("tsdb");
    let out = Command::new("promtool")
        .args(["tsdb", "create-blocks-from", "openmetrics"])
        .arg(openmetrics)
        .arg(&tsdb)
        .output()
        .expect("promtool is needed (Debian: apt install prometheus)");
    assert!(
        out.status.success(),
        "promtool failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let cfg = dir.join("prometheus.yml");
    std::fs::write(&cfg, "global:\n  scrape_interval: 1m\nscrape_configs: []\n").unwrap();
    let port = free_port();
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", cfg.display()))
        .arg(format!("--storage.tsdb.path={}", tsdb.display()))
        .arg("--storage.tsdb.retention.time=36500d")
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("prometheus is needed (Debian: apt install prometheus)");
    let mut p = Prometheus {
        child,
        url: format!("http://127.0.0.1:{port}"),
        dir: dir.to_path_buf(),
    };
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Some(status)) = p.child.try_wait() {
            panic!(
                "prometheus exited ({status}): {}",
                std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
            );
        }
        let ready = std::net::TcpStream::connect(("127.0.0.1", port))
            .ok()
            .and_then(|mut s| {
                use std::io::Read as _;
                s.write_all(b"GET /-/ready HTTP/1.0\r\n\r\n").ok()?;
                let mut buf = String::new();
                s.read_to_string(&mut buf).ok()?;
                Some(buf.starts_with("HTTP/1.0 200") || buf.starts_with("HTTP/1.1 200"))
            })
            .unwrap_or(false);
        if ready {
            return p;
        }
        assert!(Instant::now() < until, "prometheus not ready within 60 s");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Writes the small fleet and starts Prometheus on it.
pub fn small_fleet_prometheus(dir: &Path) -> Prometheus {
    let file = dir.join("history.om");
    let mut f = std::fs::File::create(&file).unwrap();
    small_fleet().write_openmetrics(&mut f).unwrap();
    drop(f);
    backfill_and_start(&file, dir)
}

/// One series of a fake Prometheus's answer: its labels and value.
pub type Series = (Vec<(&'static str, &'static str)>, f64);

/// A fake Prometheus: answers each instant query whose expression is one of
/// `answers` (exact PromQL, as `Query::render` writes it) with its series
/// `(labels, value)`, every other query and every range query with no
/// series. Returns its base URL.
pub async fn fake_prometheus(answers: Vec<(String, Vec<Series>)>) -> String {
    use axum::extract::Query;
    use axum::response::IntoResponse;
    let answers: BTreeMap<String, serde_json::Value> = answers
        .into_iter()
        .map(|(promql, rows)| {
            let rows: Vec<serde_json::Value> = rows
                .into_iter()
                .map(|(labels, v)| {
                    let metric: BTreeMap<&str, &str> = labels.into_iter().collect();
                    serde_json::json!({"metric": metric, "value": [0, v.to_string()]})
                })
                .collect();
            (promql, serde_json::Value::Array(rows))
        })
        .collect();
    let answers = std::sync::Arc::new(answers);
    let router = axum::Router::new()
        .route(
            "/api/v1/query",
            axum::routing::get(move |q: Query<BTreeMap<String, String>>| {
                let answers = answers.clone();
                async move {
                    let promql = q.0.get("query").cloned().unwrap_or_default();
                    let result = answers
                        .get(&promql)
                        .cloned()
                        .unwrap_or_else(|| serde_json::json!([]));
                    axum::Json(serde_json::json!({
                        "status": "success",
                        "data": {"resultType": "vector", "result": result}
                    }))
                    .into_response()
                }
            }),
        )
        .route(
            "/api/v1/query_range",
            axum::routing::get(|| async {
                axum::Json(serde_json::json!({
                    "status": "success",
                    "data": {"resultType": "matrix", "result": []}
                }))
                .into_response()
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a loopback port");
    let addr = listener.local_addr().expect("its address");
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    format!("http://{addr}")
}
