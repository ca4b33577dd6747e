//! A whole `/metrics` scrape of an 8-GPU node through the agent's router:
//! the fake training fixture (GPM, workloads) with an injected NVML latency
//! per call (`GPUOPS_BENCH_CALL_LATENCY_US`, default 150 µs: 30 calls, about
//! 4.5 ms per GPU read, the GPUs read in parallel), the GPM sampler in the
//! background, with and without `Accept-Encoding: gzip`.
//!
//! After criterion's medians it prints, per variant, the scrape latency
//! p50/p99 and the agent's CPU time per scrape over 300 scrapes
//! (target: p99 ≤ 40 ms).
//!
//! Measured on the 2-core CI machine (bench profile without LTO), exposition
//! 210,164 bytes plain, 13,964 gzip:
//! - 150 µs per call (4.5 ms per GPU read): median 5.55 ms plain, 5.73 ms
//!   gzip; p99 7.2 / 8.1 ms; CPU 0.9 / 1.2 ms per scrape.
//! - 800 µs per call (24 ms per GPU read, like the H200's 14–29 ms): median
//!   25.3 / 25.9 ms; p99 28.5 / 29.7 ms.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, Request};
use criterion::{criterion_group, criterion_main, Criterion};
use gpuops::collector::{self, kmsg, Context, KernelEvents, Runner};
use gpuops::config::agent::GpuBackendChoice;
use gpuops::config::AgentConfig;
use gpuops::exporter::{self, AgentState};
use gpuops::telemetry::HttpMetrics;
use http_body_util::BodyExt as _;
use tower::ServiceExt as _;

fn state() -> Arc<AgentState> {
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpu");
    let latency_us: u64 = std::env::var("GPUOPS_BENCH_CALL_LATENCY_US")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(150);
    let mut cfg = AgentConfig::default();
    cfg.collectors.cpu = false;
    cfg.collectors.memory = false;
    cfg.collectors.oom = false;
    cfg.collectors.storage = false;
    cfg.gpu.backend = GpuBackendChoice::Fake(fx.join("h100x8-training.json"));
    cfg.gpu.fake_call_latency = Duration::from_micros(latency_us);
    cfg.gpu.gpm_interval = Duration::from_secs(1);
    cfg.gpu.gpm_window = Duration::from_millis(200);
    cfg.roots.procfs = fx.join("proc");
    cfg.roots.rootfs = fx.join("root");
    cfg.roots.kmsg = fx.join("kmsg-xid.txt");
    let cfg = Arc::new(cfg);
    let events = Arc::new(KernelEvents::new());
    kmsg::read_once(&cfg.roots, &events);
    // background = true: the GPM sampler runs beside the scrapes, as in the agent.
    let ctx = Arc::new(Context::new(cfg, events.clone(), true));
    let collectors = collector::all(&ctx);
    Arc::new(AgentState {
        runner: Arc::new(Runner::new(ctx, collectors)),
        events,
        http: Arc::new(HttpMetrics::new()),
    })
}

/// One scrape through the router; returns the body size on the wire.
async fn scrape(state: &Arc<AgentState>, gzip: bool) -> usize {
    let mut req = Request::get("/metrics");
    if gzip {
        req = req.header(header::ACCEPT_ENCODING, "gzip");
    }
    let resp = exporter::router(state.clone())
        .oneshot(req.body(Body::empty()).unwrap_or_default())
        .await
        .unwrap_or_default();
    let body = resp.into_body().collect().await.map(|b| b.to_bytes());
    body.map(|b| b.len()).unwrap_or(0)
}

/// This process's user + system CPU time (/proc/self/stat, clock ticks of 10 ms).
fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // Fields after the comm: state is 0, utime 11, stime 12.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    let s = state();
    // Let the first GPM window land.
    rt.block_on(scrape(&s, false));
    std::thread::sleep(Duration::from_millis(400));
    let plain = rt.block_on(scrape(&s, false));
    let gz = rt.block_on(scrape(&s, true));
    eprintln!("exposition: {plain} bytes plain, {gz} bytes gzip");
    for (name, gzip) in [
        ("scrape_8gpu_gpm_latency_plain", false),
        ("scrape_8gpu_gpm_latency_gzip", true),
    ] {
        c.bench_function(name, |b| b.iter(|| rt.block_on(scrape(&s, gzip))));
    }
    for (name, gzip) in [("plain", false), ("gzip", true)] {
        let n = 300;
        let mut times = Vec::with_capacity(n);
        let cpu0 = process_cpu();
        for _ in 0..n {
            let t = Instant::now();
            rt.block_on(scrape(&s, gzip));
            times.push(t.elapsed());
        }
        let cpu = process_cpu().saturating_sub(cpu0);
        times.sort();
        let pct = |p: f64| times[((n as f64 * p) as usize).min(n - 1)];
        eprintln!(
            "{name}: {n} scrapes, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms, CPU {:.2} ms per scrape (incl. the GPM sampler)",
            pct(0.50).as_secs_f64() * 1e3,
            pct(0.99).as_secs_f64() * 1e3,
            times[n - 1].as_secs_f64() * 1e3,
            cpu.as_secs_f64() * 1e3 / n as f64,
        );
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
