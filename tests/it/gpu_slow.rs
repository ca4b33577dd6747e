//! The GPU path's slow values (energy counter, power limit, ECC totals,
//! retired pages, remapped rows): read in the background on their own
//! cadence and served from the last reading with its age, so a `/metrics`
//! scrape through the agent's router waits only for the fast NVML calls.
//! The fake backend logs every call with the thread that made it and injects
//! a latency per slow call.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use gpuops::collector::gpu::GpuCollector;
use gpuops::collector::{Collector, Context, KernelEvents, Runner};
use gpuops::config::agent::GpuBackendChoice;
use gpuops::config::AgentConfig;
use gpuops::exporter::{self, AgentState};
use gpuops::gpu::fake::FakeBackend;
use gpuops::telemetry::HttpMetrics;
use http_body_util::BodyExt as _;
use tower::ServiceExt as _;

/// 200 ms per slow call: a scrape that waited for them would take 400 ms
/// (two slow calls per GPU, the GPUs read in parallel).
const SLOW_CALL_LATENCY_US: u64 = 200_000;

/// The 8-GPU fixture with `slow_call_latency_us` injected.
fn slow_fixture() -> FakeBackend {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpu/h100x8.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["slow_call_latency_us"] = SLOW_CALL_LATENCY_US.into();
    FakeBackend::from_json(&path, &json.to_string()).unwrap()
}

struct Agent {
    state: Arc<AgentState>,
    fake: Arc<FakeBackend>,
    gate: Arc<gpuops::gpu::GpuGate>,
}

/// The agent's state with only the GPU collector, reading `fake`, slow
/// values every `slow_interval`, background threads on (as in the agent).
fn agent(slow_interval: Duration) -> Agent {
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpu");
    let mut cfg = AgentConfig::default();
    cfg.collectors.cpu = false;
    cfg.collectors.memory = false;
    cfg.collectors.oom = false;
    cfg.collectors.storage = false;
    cfg.gpu.backend = GpuBackendChoice::Fake(fx.join("h100x8.json"));
    cfg.gpu.gpm = false;
    cfg.gpu.slow_interval = slow_interval;
    cfg.roots.procfs = fx.join("proc");
    cfg.roots.rootfs = fx.join("root");
    cfg.roots.kmsg = fx.join("kmsg-none");
    let events = Arc::new(KernelEvents::new());
    let ctx = Arc::new(Context::new(Arc::new(cfg), events.clone(), true));
    let fake = Arc::new(slow_fixture());
    let gpu: Arc<dyn Collector> = Arc::new(GpuCollector::with_backend(&ctx, fake.clone()));
    let gate = ctx.gpu_gate.clone();
    Agent {
        state: Arc::new(AgentState {
            runner: Arc::new(Runner::new(ctx, vec![gpu])),
            events,
            http: Arc::new(HttpMetrics::new()),
        }),
        fake,
        gate,
    }
}

/// One `/metrics` request through the agent's router: how long it took and
/// the exposition.
async fn scrape(state: &Arc<AgentState>) -> (Duration, String) {
    let started = Instant::now();
    let resp = exporter::router(state.clone())
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (started.elapsed(), String::from_utf8(body.to_vec()).unwrap())
}

/// The value of the first sample of `name` for GPU 0.
fn gpu0(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(&format!("{name}{{gpu=\"0\",")))
        .and_then(|l| l.rsplit_once(' '))
        .and_then(|(_, v)| v.parse().ok())
}

fn kinds(fake: &FakeBackend) -> Vec<&'static str> {
    fake.calls().iter().map(|c| c.kind).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrape_does_not_wait_for_slow_nvml_values() {
    let agent = agent(Duration::from_secs(3600));
    // The first collection reads the slow values once (there are none yet).
    let (_, first) = scrape(&agent.state).await;
    assert!(gpu0(&first, "gpu_energy_joules_total").is_some(), "{first}");
    assert_eq!(kinds(&agent.fake), ["snapshot", "slow_snapshot"]);

    // Later scrapes call only the fast snapshot: the scrape path makes no
    // slow call, however many scrapes come.
    let mut slowest = Duration::ZERO;
    for _ in 0..5 {
        let (took, text) = scrape(&agent.state).await;
        slowest = slowest.max(took);
        assert!(gpu0(&text, "gpu_energy_joules_total").is_some(), "{text}");
        assert!(gpu0(&text, "gpu_utilization_percent").is_some(), "{text}");
    }
    assert_eq!(
        kinds(&agent.fake),
        [
            "snapshot",
            "slow_snapshot",
            "snapshot",
            "snapshot",
            "snapshot",
            "snapshot",
            "snapshot"
        ]
    );
    // Generous: a scrape that waited for the slow calls takes 400 ms.
    assert!(
        slowest < Duration::from_millis(300),
        "slowest scrape {slowest:?}"
    );
    println!("slowest of 5 scrapes with 200 ms slow calls: {slowest:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_values_are_read_in_the_background_and_served_with_their_age() {
    let agent = agent(Duration::from_millis(300));
    let (_, first) = scrape(&agent.state).await;
    let age0 = gpu0(&first, "gpuops_gpu_slow_read_age_seconds").expect("age exported");
    assert!(age0 < 1.0, "{age0}");
    let took = gpu0(&first, "gpuops_gpu_slow_read_duration_seconds").expect("duration");
    assert!(took >= 0.4, "two 200 ms slow calls took {took}");
    assert_eq!(
        gpu0(&first, "gpu_energy_joules_total"),
        Some(91234567.891),
        "{first}"
    );
    // The background thread reads them again on its own cadence, on its
    // own thread: never on a scrape's.
    let until = Instant::now() + Duration::from_secs(20);
    while kinds(&agent.fake)
        .iter()
        .filter(|k| **k == "slow_snapshot")
        .count()
        < 3
    {
        assert!(Instant::now() < until, "{:?}", agent.fake.calls());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let calls = agent.fake.calls();
    let background: Vec<_> = calls
        .iter()
        .filter(|c| c.kind == "slow_snapshot")
        .skip(1)
        .collect();
    assert!(
        background.iter().all(|c| c.thread == "gpuops-gpu-slow"),
        "{calls:?}"
    );
    let (_, later) = scrape(&agent.state).await;
    let age = gpu0(&later, "gpuops_gpu_slow_read_age_seconds").unwrap();
    assert!(age < 5.0, "{age}");
    assert_eq!(gpu0(&later, "gpu_energy_joules_total"), Some(91234567.891));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_values_are_not_read_or_served_across_a_gpu_release() {
    let agent = agent(Duration::from_millis(200));
    let (_, first) = scrape(&agent.state).await;
    assert!(gpu0(&first, "gpu_energy_joules_total").is_some());
    let backend = agent.gate.backend().unwrap();
    agent.gate.begin_release("node:gpu-reset").unwrap();
    backend.release().unwrap();
    // The background thread would have read twice by now: it reads nothing.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, during) = scrape(&agent.state).await;
    assert!(during.contains("\ngpuops_gpu_released 1\n"), "{during}");
    assert!(!during.contains("gpu_energy_joules_total{"), "{during}");
    assert_eq!(agent.fake.release_counts().2, 0, "{:?}", agent.fake.calls());
    backend.reinit().unwrap();
    agent.gate.end_release();
    // Values read before the reset are not served after it: the first
    // scrape reads them anew.
    let before = kinds(&agent.fake).len();
    let (_, after) = scrape(&agent.state).await;
    assert!(gpu0(&after, "gpu_energy_joules_total").is_some(), "{after}");
    let age = gpu0(&after, "gpuops_gpu_slow_read_age_seconds").unwrap();
    assert!(age < 1.0, "served a reading from before the release: {age}");
    assert!(
        kinds(&agent.fake)[before..].contains(&"slow_snapshot"),
        "{:?}",
        agent.fake.calls()
    );
}
