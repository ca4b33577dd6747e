//! Full collect + render of the 8× H100 fake fixture (the GPU collector, its
//! XIDs and processes, and the kmsg collector), as one `/metrics` scrape does
//! it. Target: median ≤ 1 ms.

use std::path::Path;
use std::sync::Arc;

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
    cfg.gpu.backend = GpuBackendChoice::Fake(fx.join("h100x8.json"));
    cfg.roots.procfs = fx.join("proc");
    cfg.roots.kmsg = fx.join("kmsg-xid.txt");
    let events = Arc::new(KernelEvents::new());
    kmsg::read_once(&cfg.roots, &events);
    let ctx = Arc::new(Context::new(Arc::new(cfg), events, false));
    let collectors = collector::all(&ctx);
    Runner::new(ctx, collectors)
}

fn bench(c: &mut Criterion) {
    let r = runner();
    let first = r.collect();
    assert!(first.iter().all(|c| c.success), "fixture collection failed");
    c.bench_function("gpu_collect_render_h100x8", |b| {
        b.iter(|| {
            let collected = r.collect();
            let text = gpuops::exporter::render_with_self_metrics(&r, &collected, None);
            assert!(text.len() > 100_000);
            text
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
