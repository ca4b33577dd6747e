//! Criterion benches of one scrape: every host collector run through the
//! runner (threads, deadlines) and rendered as Prometheus text, on the fixture
//! tree and on this machine's own /proc and /sys; and one whole `/metrics`
//! request through the agent's router (HTTP metrics middleware, compression
//! layer, handler, self-metrics), as a kept-alive Prometheus scrape is
//! served, without the TCP round trip (`scripts/compare-node-exporter` has
//! that). Run with `cargo bench --bench collect`.
//!
//! Measured 2026-12-03 on the 2-core CI machine, the node build's profile
//! (`cargo bench --bench collect --profile release-agent
//! --no-default-features --features agent`), criterion medians: this host
//! collected and rendered 109.0 µs (182–263 µs when issue 23 was filed),
//! the whole `/metrics` request through the router 122.4 µs (gzip 191.7 µs),
//! the fixture tree 174.5 µs; per collector: cpu 8.8 µs, memory 24.2 µs,
//! oom 15.2 µs, storage 65.8 µs (its statvfs batch on a thread, with its
//! deadline), kmsg 0.2 µs; self-metrics 4.5 µs (process) + 15.0 µs (HTTP).

use std::path::Path;
use std::sync::Arc;

use axum::body::Body;
use axum::http::Request;
use criterion::{criterion_group, criterion_main, Criterion};
use gpuops::collector::{self, kmsg, Context, KernelEvents, Runner, Sink};
use gpuops::config::AgentConfig;
use gpuops::exporter::{self, AgentState};
use gpuops::telemetry::HttpMetrics;
use http_body_util::BodyExt as _;
use tower::ServiceExt as _;

fn runner(cfg: AgentConfig) -> Runner {
    let cfg = Arc::new(cfg);
    let events = Arc::new(KernelEvents::new());
    kmsg::read_once(&cfg.roots, &events);
    // background: the CPU sampler thread runs, as in the agent.
    let ctx = Arc::new(Context::new(cfg, events, true));
    let collectors = collector::all(&ctx);
    Runner::new(ctx, collectors)
}

fn fixture_config() -> AgentConfig {
    let f = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/host/full");
    let mut cfg = AgentConfig::default();
    cfg.roots.procfs = f.join("proc");
    cfg.roots.sysfs = f.join("sys");
    cfg.roots.rootfs = f.join("root");
    cfg.roots.kmsg = f.join("kmsg");
    cfg.collectors.gpu = false;
    cfg
}

fn bench(c: &mut Criterion) {
    let fixture = runner(fixture_config());
    c.bench_function("collect_render_fixture", |b| {
        b.iter(|| {
            let collected = fixture.collect();
            exporter::render_with_self_metrics(&fixture, &collected, None)
        })
    });

    let mut host_cfg = AgentConfig::default();
    host_cfg.collectors.gpu = false;
    // The kernel log is not needed for the scrape itself.
    host_cfg.roots.kmsg = "/nonexistent".into();
    let host = runner(host_cfg);
    c.bench_function("collect_render_this_host", |b| {
        b.iter(|| {
            let collected = host.collect();
            exporter::render_with_self_metrics(&host, &collected, None)
        })
    });
}

/// One `/metrics` request through the agent's router on this machine, on a
/// runtime like the agent's (two workers), with and without gzip.
fn bench_router(c: &mut Criterion) {
    let mut cfg = AgentConfig::default();
    cfg.collectors.gpu = false;
    cfg.roots.kmsg = "/nonexistent".into();
    let runner = Arc::new(runner(cfg));
    let state = Arc::new(AgentState {
        runner,
        events: Arc::new(KernelEvents::new()),
        http: Arc::new(HttpMetrics::new()),
    });
    let app = exporter::router(state);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    for (name, gzip) in [
        ("scrape_router_this_host", false),
        ("scrape_router_this_host_gzip", true),
    ] {
        c.bench_function(name, |b| {
            b.iter(|| {
                rt.block_on(async {
                    let mut req = Request::get("/metrics");
                    if gzip {
                        req = req.header("accept-encoding", "gzip");
                    }
                    let resp = app
                        .clone()
                        .oneshot(req.body(Body::empty()).unwrap_or_default())
                        .await
                        .unwrap_or_default();
                    let body = resp.into_body().collect().await.map(|b| b.to_bytes());
                    body.map(|b| b.len()).unwrap_or(0)
                })
            })
        });
    }
}

/// Each collector alone, called directly (no runner thread), on this machine.
fn bench_each(c: &mut Criterion) {
    let mut cfg = AgentConfig::default();
    cfg.collectors.gpu = false;
    cfg.roots.kmsg = "/nonexistent".into();
    let cfg = Arc::new(cfg);
    let ctx = Arc::new(Context::new(cfg, Arc::new(KernelEvents::new()), true));
    for col in collector::all(&ctx) {
        c.bench_function(&format!("collector_{}", col.name()), |b| {
            b.iter(|| {
                let mut sink = Sink::new();
                let _ = col.collect(&ctx, &mut sink);
                sink
            })
        });
    }
    c.bench_function("process_text", |b| {
        b.iter(|| {
            let mut out = String::new();
            gpuops::telemetry::process_text(&mut out);
            out
        })
    });
    // The RED metrics of a server that has answered a few routes, gathered
    // and written as each scrape does (`collector::encode_families`), and
    // through the prometheus crate's text encoder, as scrapes did before.
    let http = HttpMetrics::new();
    for (endpoint, status) in [("/metrics", 200), ("/healthz", 200), ("/v1/events", 400)] {
        http.observe(endpoint, "GET", status, 0.001, Some(0), Some(1000));
    }
    c.bench_function("http_metrics_gather_encode", |b| {
        b.iter(|| {
            let mut out = String::new();
            collector::encode_families(&http.gather(), &mut out);
            out
        })
    });
    c.bench_function("http_metrics_gather_text_encoder", |b| {
        b.iter(|| {
            let mut out = String::new();
            let _ = prometheus::TextEncoder::new().encode_utf8(&http.gather(), &mut out);
            out
        })
    });
}

criterion_group!(benches, bench, bench_router, bench_each);
criterion_main!(benches);
