//! The GPU collector's scrape with and without the kubelet's pod-resources
//! mapping: 8 GPUs in MIG mode (7 instances each: 56), 110 pods on the node
//! of which 56 hold one MIG instance each (the other 54 hold no GPU: the
//! background reader drops them, the scrape never sees them), processes of
//! two pods on GPUs 0 and 1. The fake backend answers at once, so the
//! figures are the collector's own work (rendering, the mapping's join).
//! It also times the background reader's decode of that node's `List`
//! answer (not on the scrape path).
//!
//! Run with the node build's profile (what ships):
//! `cargo bench --profile release-agent --no-default-features --features agent --bench pod_resources`.
//!
//! Measured on the shared 2-core machine, criterion medians. With
//! `gpu_pod_info` rendered on every scrape (release-agent profile, two
//! runs): no mapping 350.6 µs / 516.7 µs, 110 pods mapped 402.0 µs /
//! 592.6 µs (+51 µs / +76 µs, about 15 %: the 56 series, 178,461 → 196,097
//! bytes of exposition). Rendered once per mapping or GPU change and
//! appended on each scrape (`gpu_workload::PodInfoCache`; release profile,
//! quiet machine): no mapping 214.9 µs [211.8, 218.1], mapped 218.3 µs
//! [214.4, 222.4] (+3.4 µs, +1.6 %, the intervals overlap). The background
//! decode of the node's 9,638-byte `List` answer: 49.8 µs (102 µs / 62 µs
//! on the busy machine).

use std::path::Path;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use gpuops::collector::gpu::GpuCollector;
use gpuops::collector::{Collector as _, Context, KernelEvents, Sink};
use gpuops::config::agent::KubernetesEnabled;
use gpuops::config::AgentConfig;
use gpuops::gpu::fake::FakeBackend;
use gpuops::kubelet::proto;
use prost::Message as _;

const GPUS: usize = 8;
const MIG_PER_GPU: usize = 7;
const PODS: usize = 110;

fn mig_uuid(gpu: usize, k: usize) -> String {
    format!("MIG-{gpu:08x}-{k:04x}-5a7b-8c9d-0e1f2a3b4c5d")
}

/// The 8-GPU fixture with every GPU split into seven 1g.10gb instances.
fn fixture(dir: &Path) -> std::path::PathBuf {
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let text = std::fs::read_to_string(fx.join("kubelet/gpus8.json")).expect("fixture");
    let mut v: serde_json::Value = serde_json::from_str(&text).expect("json");
    let devices = v["devices"].as_array_mut().expect("devices");
    for (g, d) in devices.iter_mut().enumerate() {
        d["mig"] = (0..MIG_PER_GPU)
            .map(|k| {
                serde_json::json!({
                    "gpu_instance_id": 7 + k, "compute_instance_id": 0, "profile": "1g.10gb",
                    "uuid": mig_uuid(g, k), "memory_used_bytes": 1u64 << 30,
                    "memory_total_bytes": 10u64 << 30,
                })
            })
            .collect();
    }
    devices[0]["processes"] = serde_json::json!([{"pid": 62100, "memory_used_bytes": 1u64 << 30}]);
    let path = dir.join("mig56.json");
    std::fs::write(&path, v.to_string()).expect("write fixture");
    path
}

/// The node's `List` answer: 110 pods, 56 with a MIG instance.
fn list_answer() -> Vec<u8> {
    let pod_resources = (0..PODS)
        .map(|i| {
            let devices = if i < GPUS * MIG_PER_GPU {
                vec![proto::ContainerDevices {
                    resource_name: "nvidia.com/mig-1g.10gb".into(),
                    device_ids: vec![mig_uuid(i / MIG_PER_GPU, i % MIG_PER_GPU)],
                }]
            } else {
                Vec::new()
            };
            proto::PodResources {
                name: format!("inference-{i:03}-7d9f8b6c5d-x2x4z"),
                namespace: "serving".into(),
                containers: vec![proto::ContainerResources {
                    name: "server".into(),
                    devices,
                }],
            }
        })
        .collect();
    proto::ListPodResourcesResponse { pod_resources }.encode_to_vec()
}

fn collector(fixture: &Path, mapped: bool) -> (Arc<Context>, GpuCollector) {
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpu");
    let mut cfg = AgentConfig::default();
    cfg.roots.procfs = fx.join("proc");
    cfg.roots.rootfs = fx.join("root");
    cfg.gpu.gpm = false;
    cfg.kubernetes.enabled = if mapped {
        KubernetesEnabled::On
    } else {
        KubernetesEnabled::Off
    };
    let ctx = Arc::new(Context::new(
        Arc::new(cfg),
        Arc::new(KernelEvents::new()),
        false,
    ));
    if mapped {
        let map = gpuops::kubelet::decode_list(&list_answer(), &[]).expect("decode");
        assert_eq!(map.allocations.len(), GPUS * MIG_PER_GPU);
        ctx.pod_resources.store(Ok(map));
    }
    let backend = FakeBackend::load(fixture).expect("load fixture");
    let gpu = GpuCollector::with_backend(&ctx, Arc::new(backend));
    (ctx, gpu)
}

fn scrape(ctx: &Context, gpu: &GpuCollector) -> usize {
    let mut sink = Sink::new();
    let _ = gpu.collect(ctx, &mut sink);
    sink.into_text().len()
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let fx = fixture(dir.path());
    let answer = list_answer();
    eprintln!("List answer: {} bytes", answer.len());
    for (name, mapped) in [
        ("gpu_scrape_8gpu_56mig_no_mapping", false),
        ("gpu_scrape_8gpu_56mig_110pods_mapped", true),
    ] {
        let (ctx, gpu) = collector(&fx, mapped);
        let bytes = scrape(&ctx, &gpu);
        let pod_info = {
            let mut sink = Sink::new();
            let _ = gpu.collect(&ctx, &mut sink);
            sink.into_text().matches("\ngpu_pod_info{").count()
        };
        eprintln!("{name}: exposition {bytes} bytes, {pod_info} gpu_pod_info series");
        c.bench_function(name, |b| b.iter(|| scrape(&ctx, &gpu)));
    }
    c.bench_function("pod_resources_decode_110pods", |b| {
        b.iter(|| gpuops::kubelet::decode_list(&answer, &[]).map(|m| m.allocations.len()))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
