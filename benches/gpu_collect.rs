//! Full collect + render of the 8× H100 fake fixture (the GPU collector, its
//! XIDs and processes, and the kmsg collector), as one `/metrics` scrape does
//! it. Target: median ≤ 1 ms.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use gpuops::collector::{self, kmsg, Context, KernelEvents, Runner};
use gpuops::config::agent::GpuBackendChoice;
use gpuops::config::AgentConfig;

fn runner() -> Runner {
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpu");
    let mut cfg = AgentConfig::default();
    cfg.collectors.cpu = false;
    cfg.collectors.memory = false;
    cfg.collectors.oom = false;
    cfg.collectors.storage = false;
    // GPUOPS_BENCH_FIXTURE overrides the fixture (to compare shapes).
    let fixture = std::env::var_os("GPUOPS_BENCH_FIXTURE")
        .map_or_else(|| fx.join("h100x8.json"), std::path::PathBuf::from);
    cfg.gpu.backend = GpuBackendChoice::Fake(fixture);
    cfg.roots.procfs = fx.join("proc");
    cfg.roots.kmsg = fx.join("kmsg-xid.txt");
    let events = Arc::new(KernelEvents::new());
    kmsg::read_once(&cfg.roots, &events);
    let ctx = Arc::new(Context::new(Arc::new(cfg), events, false));
    let collectors = collector::all(&ctx);
    Runner::new(ctx, collectors)
}

/// Nanoseconds this thread has spent on a CPU.
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn bench(c: &mut Criterion) {
    let r = runner();
    let first = r.collect();
    assert!(first.iter().all(|c| c.success), "fixture collection failed");
    c.bench_function("gpu_collect_render_h100x8", |b| {
        b.iter(|| {
            let collected = r.collect();
            let text = gpuops::exporter::render_with_self_metrics(&r, &collected, None);
            assert!(text.len() > 10_000);
            text
        })
    });
    // Every collector called directly (no runner threads, no result sharing
    // between back-to-back runs), then rendered: the work itself.
    let ctx = r.context().clone();
    let direct = collector::all(&ctx);
    let once = || {
        let collected: Vec<collector::Collected> = direct
            .iter()
            .map(|col| {
                let mut sink = collector::Sink::new();
                let ok = col.collect(&ctx, &mut sink).is_ok();
                collector::Collected {
                    name: col.name(),
                    success: ok,
                    errors: Arc::new(Vec::new()),
                    unavailable: false,
                    duration: Duration::ZERO,
                    text: Arc::new(sink.into_text()),
                }
            })
            .collect();
        gpuops::exporter::render_with_self_metrics(&r, &collected, None)
    };
    c.bench_function("gpu_collect_render_direct_h100x8", |b| b.iter(once));
    // The same, timed by this thread's on-CPU time (/proc/thread-self/schedstat):
    // the work itself, not the time spent waiting for a CPU on a busy machine.
    c.bench_function("gpu_collect_render_direct_h100x8_cpu", |b| {
        b.iter_custom(|iters| {
            let start = thread_cpu_ns();
            for _ in 0..iters {
                criterion::black_box(once());
            }
            Duration::from_nanos(thread_cpu_ns().saturating_sub(start))
        })
    });
    let pre = {
        let mut sink = collector::Sink::new();
        let _ = direct[0].collect(&ctx, &mut sink);
        vec![collector::Collected {
            name: "gpu",
            success: true,
            errors: Arc::new(Vec::new()),
            unavailable: false,
            duration: Duration::ZERO,
            text: Arc::new(sink.into_text()),
        }]
    };
    c.bench_function("gpu_render_only_h100x8_cpu", |b| {
        b.iter_custom(|iters| {
            let start = thread_cpu_ns();
            for _ in 0..iters {
                criterion::black_box(collector::render(&pre, "", &[]));
            }
            Duration::from_nanos(thread_cpu_ns().saturating_sub(start))
        })
    });
    c.bench_function("gpu_collect_only_direct_h100x8_cpu", |b| {
        b.iter_custom(|iters| {
            let start = thread_cpu_ns();
            for _ in 0..iters {
                let mut sink = collector::Sink::new();
                let _ = direct[0].collect(&ctx, &mut sink);
                criterion::black_box(sink.into_text());
            }
            Duration::from_nanos(thread_cpu_ns().saturating_sub(start))
        })
    });
    c.bench_function("self_metrics_only", |b| {
        b.iter(|| gpuops::exporter::render_with_self_metrics(&r, &[], None))
    });
    // The parts, to see where the time goes.
    c.bench_function("gpu_collect_only_h100x8", |b| b.iter(|| r.collect()));
    let collected = r.collect();
    c.bench_function("gpu_render_only_h100x8", |b| {
        b.iter(|| gpuops::exporter::render_with_self_metrics(&r, &collected, None))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
