//! The metric reference `docs/metrics.md` is generated from what the agent
//! really exports: every family in every `tests/golden/*.prom`, plus the
//! families a one-shot fixture scrape cannot show (the CPU utilization ring,
//! the HTTP server's RED metrics), taken from the library itself so their
//! help text cannot drift. `GPUOPS_BLESS=1 cargo test --test it metric_reference::`
//! regenerates the file; otherwise the test fails when it is out of date.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gpuops::collector::cpu::{CpuCollector, Ring, Sample};
use gpuops::collector::{Collector as _, Context, KernelEvents, Sink};
use gpuops::config::AgentConfig;
use gpuops::telemetry::HttpMetrics;

#[derive(Debug, Default, Clone)]
struct Family {
    kind: String,
    help: String,
    labels: Vec<String>,
    sources: Vec<String>,
}

/// Reads the families of one exposition into `out`, recording `source`.
fn read_exposition(text: &str, source: &str, out: &mut BTreeMap<String, Family>) {
    let mut kinds: BTreeMap<String, String> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            out.entry(name.to_string()).or_default().help = help.replace("\\\\", "\\");
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let f = out.entry(name.to_string()).or_default();
            f.kind = kind.to_string();
            if !f.sources.iter().any(|s| s == source) {
                f.sources.push(source.to_string());
            }
            kinds.insert(name.to_string(), kind.to_string());
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            let name_end = line.find(['{', ' ']).unwrap_or(line.len());
            let sample = &line[..name_end];
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .filter_map(|s| sample.strip_suffix(s))
                .find(|base| {
                    kinds
                        .get(*base)
                        .is_some_and(|k| k == "histogram" || k == "summary")
                })
                .unwrap_or(sample);
            let f = out.entry(family.to_string()).or_default();
            for l in label_names(&line[name_end..]) {
                if l != "le" && l != "quantile" && !f.labels.contains(&l) {
                    f.labels.push(l);
                }
            }
        }
    }
}

/// The label names of `{a="x",b="y, \"z\""} 1`.
fn label_names(rest: &str) -> Vec<String> {
    let Some(body) = rest.strip_prefix('{') else {
        return Vec::new();
    };
    let mut names = Vec::new();
    let mut chars = body.chars();
    let mut name = String::new();
    while let Some(c) = chars.next() {
        match c {
            '=' => {
                names.push(std::mem::take(&mut name));
                // Skip the quoted value, honouring escapes.
                let _open = chars.next();
                while let Some(v) = chars.next() {
                    match v {
                        '\\' => {
                            chars.next();
                        }
                        '"' => break,
                        _ => {}
                    }
                }
            }
            ',' | ' ' => {}
            '}' => break,
            _ => name.push(c),
        }
    }
    names
}

/// Families a one-shot scrape of the fixtures cannot show, rendered by the library.
fn library_only_families() -> String {
    let mut text = String::new();
    let encoder = prometheus::TextEncoder::new();

    let mut cfg = AgentConfig::default();
    let missing = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/host/missing");
    cfg.roots.procfs = missing.join("proc");
    cfg.roots.sysfs = missing.join("sys");
    cfg.roots.kmsg = missing.join("kmsg");
    let ctx = Context::new(Arc::new(cfg), Arc::new(KernelEvents::new()), false);
    let ring = Arc::new(Ring::new(Duration::from_secs(10)));
    let t0 = Instant::now();
    ring.push(Sample {
        at: t0,
        busy: 0,
        total: 0,
    });
    ring.push(Sample {
        at: t0 + Duration::from_secs(1),
        busy: 1,
        total: 2,
    });
    let mut sink = Sink::new();
    CpuCollector::with_ring(ring)
        .collect(&ctx, &mut sink)
        .expect("cpu collect");
    text.push_str(&sink.into_text());

    // The scheduler's view of the node (`[node_state] slurm`, off by default).
    let ctx = Arc::new(ctx);
    ctx.scheduler
        .set(gpuops::collector::node_state::parse_scontrol(
            "NodeName=n1 State=IDLE+DRAIN Reason=maintenance [root@2026-12-03T10:00:00]",
        ));
    let mut sink = Sink::new();
    gpuops::collector::node_state::NodeStateCollector::new(&ctx)
        .collect(&ctx, &mut sink)
        .expect("node_state collect");
    text.push_str(&sink.into_text());

    text.push_str(&pod_resources_families());

    let http = HttpMetrics::new();
    http.observe("/metrics", "GET", 200, 0.001, Some(0), Some(100));
    encoder
        .encode_utf8(&http.gather(), &mut text)
        .expect("encode");

    // The bot's node families (nodes out of service), which alert rules use.
    let bot = gpuops::bot::state::BotMetrics::new();
    bot.set_nodes(
        &[("quarantined", 1)],
        &[("gpu-node-17", "quarantined", 3600.0)],
    );
    let nodes: Vec<_> = bot
        .gather()
        .into_iter()
        .filter(|f| f.name().starts_with("gpuops_node"))
        .collect();
    encoder.encode_utf8(&nodes, &mut text).expect("encode");
    text
}

/// `[kubernetes]` on: the GPU collector on the 8-GPU fixture with a
/// pod-resources mapping (`gpu_pod_info`, pod names on `gpu_workload_*`),
/// and the `pod_resources` collector.
fn pod_resources_families() -> String {
    use gpuops::kubelet::{parse_device_id, Allocation, PodMap};
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut cfg = AgentConfig::default();
    cfg.roots.procfs = fixtures.join("gpu/proc");
    cfg.roots.rootfs = fixtures.join("gpu/root");
    cfg.gpu.gpm = false;
    cfg.kubernetes.enabled = gpuops::config::agent::KubernetesEnabled::On;
    let ctx = Arc::new(Context::new(
        Arc::new(cfg),
        Arc::new(KernelEvents::new()),
        false,
    ));
    let alloc = |pod: &str, resource: &str, id: &str| {
        let (device, replica) = parse_device_id(id);
        Allocation {
            namespace: "training".into(),
            pod: pod.into(),
            container: "trainer".into(),
            resource: resource.into(),
            device,
            replica,
        }
    };
    ctx.pod_resources.store(Ok(PodMap {
        allocations: vec![
            alloc(
                "a",
                "nvidia.com/gpu",
                "GPU-7b2d1f4c-2a3e-4c6b-8d8f-1e2f3a4b5c61",
            ),
            alloc(
                "b",
                "nvidia.com/gpu",
                "GPU-9d4f3b6e-4c5a-4e8d-8fab-3a4b5c6d7e83::0",
            ),
            alloc(
                "c",
                "nvidia.com/mig-1g.10gb",
                "MIG-3c4d5e6f-7a8b-5c9d-0e1f-2a3b4c5d6e7f",
            ),
        ],
    }));
    let backend = gpuops::gpu::fake::FakeBackend::load(&fixtures.join("kubelet/gpus8.json"))
        .expect("the 8-GPU fixture");
    let gpu = gpuops::collector::gpu::GpuCollector::with_backend(&ctx, Arc::new(backend));
    let mut sink = Sink::new();
    gpu.collect(&ctx, &mut sink).expect("gpu collect");
    gpuops::collector::pod_resources::PodResourcesCollector
        .collect(&ctx, &mut sink)
        .expect("pod_resources collect");
    sink.into_text()
}

const SECTIONS: &[(&str, &str)] = &[
    ("cpu_", "CPU"),
    ("memory_", "Memory"),
    ("oom_", "OOM"),
    ("storage_", "Storage"),
    ("gpu_", "GPU"),
    ("DCGM_", "GPU (dcgm-exporter names)"),
    ("gpuops_node", "Bot: nodes out of service"),
    ("gpuops_", "Agent self-metrics"),
    ("api_", "HTTP server (RED)"),
    ("process_", "Process"),
];

fn render(families: &BTreeMap<String, Family>) -> String {
    let mut out = String::from(
        "# Metric reference\n\n\
         Generated by `GPUOPS_BLESS=1 cargo test --test it metric_reference::` from the golden\n\
         expositions in `tests/golden/*.prom` (what the agent prints on the fixture trees) and\n\
         from the library for the families a one-shot fixture scrape cannot show (and the\n\
         bot's node families, which the shipped alert rules use). Do not edit\n\
         by hand; `cargo test` fails when this file is out of date.\n\n\
         The help text names where each value is read from. A value that cannot be read is\n\
         left out, never exported as 0.\n",
    );
    let mut placed: Vec<&str> = Vec::new();
    let mut sections: Vec<(&str, Vec<(&String, &Family)>)> = Vec::new();
    for (prefix, title) in SECTIONS {
        let rows: Vec<_> = families
            .iter()
            .filter(|(n, _)| n.starts_with(prefix) && !placed.contains(&n.as_str()))
            .collect();
        placed.extend(rows.iter().map(|(n, _)| n.as_str()));
        sections.push((title, rows));
    }
    let other: Vec<_> = families
        .iter()
        .filter(|(n, _)| !placed.contains(&n.as_str()))
        .collect();
    sections.push(("Other", other));
    for (title, rows) in sections {
        if rows.is_empty() {
            continue;
        }
        out.push_str(&format!(
            "\n## {title}\n\n| name | type | labels | help (source) |\n|---|---|---|---|\n"
        ));
        for (name, f) in rows {
            let labels = f
                .labels
                .iter()
                .map(|l| format!("`{l}`"))
                .collect::<Vec<_>>()
                .join(", ");
            out.push_str(&format!(
                "| `{name}` | {} | {labels} | {} |\n",
                f.kind,
                markdown_text(&f.help)
            ));
        }
    }
    out
}

/// Help text as literal Markdown table text.
fn markdown_text(s: &str) -> String {
    s.replace('|', "\\|")
        .replace('*', "\\*")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn generate() -> (String, BTreeMap<String, Family>) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut goldens: Vec<_> = std::fs::read_dir(root.join("tests/golden"))
        .expect("tests/golden")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "prom"))
        .collect();
    goldens.sort();
    assert!(!goldens.is_empty(), "no tests/golden/*.prom");
    let mut families = BTreeMap::new();
    for g in &goldens {
        let text = std::fs::read_to_string(g).expect("read golden");
        let name = g
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        read_exposition(&text, &name, &mut families);
    }
    read_exposition(&library_only_families(), "library", &mut families);
    (render(&families), families)
}

#[test]
fn every_exported_family_is_in_the_metric_reference() {
    let (want, families) = generate();
    let doc_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/metrics.md");
    if std::env::var_os("GPUOPS_BLESS").is_some_and(|v| v == "1") {
        std::fs::create_dir_all(doc_path.parent().expect("docs dir")).expect("mkdir docs");
        std::fs::write(&doc_path, &want).expect("write docs/metrics.md");
        return;
    }
    let doc = std::fs::read_to_string(&doc_path).unwrap_or_default();
    let missing: Vec<_> = families
        .keys()
        .filter(|n| !doc.contains(&format!("| `{n}` |")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/metrics.md lacks {missing:?}; run GPUOPS_BLESS=1 cargo test --test it metric_reference::"
    );
    assert!(
        doc == want,
        "docs/metrics.md is out of date; run GPUOPS_BLESS=1 cargo test --test it metric_reference::"
    );
}

#[test]
fn label_names_skip_quoted_values() {
    assert_eq!(
        label_names(r#"{mountpoint="/mnt/my, \"odd\" dir",device="sda"} 1"#),
        ["mountpoint", "device"]
    );
    assert!(label_names(" 1").is_empty());
}

#[test]
fn contract_families_are_present() {
    let (_, families) = generate();
    for name in [
        "cpu_utilization_percent",
        "cpu_seconds_total",
        "cpu_throttle_seconds_total",
        "cpu_thermal_throttle_events_total",
        "cpu_errors_total",
        "cpu_pressure_stall_seconds_total",
        "cpu_load_average",
        "cpu_cores",
        "memory_total_bytes",
        "memory_available_bytes",
        "memory_used_bytes",
        "memory_pressure_events_total",
        "memory_pressure_stall_seconds_total",
        "memory_errors_total",
        "memory_swap_total_bytes",
        "memory_swap_used_bytes",
        "oom_kills_total",
        "oom_kill_last_timestamp_seconds",
        "storage_total_bytes",
        "storage_used_bytes",
        "storage_available_bytes",
        "storage_inodes",
        "storage_inodes_free",
        "storage_readonly",
        "storage_mount_stuck",
        "storage_reads_total",
        "storage_writes_total",
        "storage_read_bytes_total",
        "storage_written_bytes_total",
        "storage_io_time_seconds_total",
        "storage_io_weighted_time_seconds_total",
        "storage_io_in_progress",
        "storage_io_pressure_stall_seconds_total",
        "storage_errors_total",
        "gpuops_collector_success",
        "gpuops_collector_duration_seconds",
        "gpuops_build_info",
        "api_requests_total",
        "api_request_duration_seconds",
    ] {
        assert!(families.contains_key(name), "{name} is exported nowhere");
    }
}
