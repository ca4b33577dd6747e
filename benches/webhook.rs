//! Webhook benchmark: AlertManager webhooks of 100 alerts each into the real
//! bot (router, SQLite store with fsync on every commit, outbox worker, Slack
//! notifier) against a local fake Slack API.
//!
//! Phase 1 (open loop, `BENCH_RATE` alerts/s for `BENCH_SECS`): p50/p99 of
//! the acknowledgement latency (request sent → 200, i.e. durably stored) and
//! of alert-to-chat-call latency (request sent → the fake Slack receives the
//! post). Phase 2 (closed loop, `BENCH_CONCURRENCY` clients): the sustained
//! maximum in alerts/s. Run: `cargo bench --bench webhook`
//! (`BENCH_SYNC=normal` for `[store] sync = "normal"`). On PostgreSQL:
//! `BENCH_POSTGRES_URL=postgres://...` (a fresh schema is made there) and
//! `BENCH_REPLICAS=3` for three bots on that database, webhooks spread
//! over them round-robin.

#[path = "../tests/it/support/mod.rs"]
mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gpuops::bot::BotState;
use gpuops::bot_role::router;
use gpuops::config::BotConfig;
use gpuops::store::Store;
use support::FakeApi;

const ALERTS_PER_WEBHOOK: usize = 100;

fn env_or(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn payload(group: usize, round: usize) -> String {
    let alerts: Vec<serde_json::Value> = (0..ALERTS_PER_WEBHOOK)
        .map(|i| {
            serde_json::json!({
                "status": "firing",
                "labels": {"alertname": format!("Bench{group}"), "severity": "critical",
                           "instance": format!("gpu-node-{i:03}.cluster.example.com:9949"), "gpu": (i % 8).to_string(),
                           "xid": "79", "job": "gpuops-agent"},
                "annotations": {"summary": format!("GPU {} on node {i} has fallen off the bus", i % 8),
                                "description": "XID 79: the GPU is no longer reachable over PCIe; drain the node.",
                                "runbook_id": "gpu-fell-off-bus"},
                "startsAt": format!("2026-01-01T00:{:02}:00Z", round % 60),
                "endsAt": "0001-01-01T00:00:00Z",
                "generatorURL": "http://prometheus:9090/graph?g0.expr=gpu_xid_errors_total",
                "fingerprint": format!("{group:08x}{i:08x}")
            })
        })
        .collect();
    serde_json::json!({
        "version": "4", "groupKey": format!("{{}}:{{alertname=\"Bench{group}\"}}"), "truncatedAlerts": 0,
        "status": "firing", "receiver": "gpuops",
        "groupLabels": {"alertname": format!("Bench{group}")},
        "commonLabels": {"alertname": format!("Bench{group}"), "severity": "critical", "xid": "79", "job": "gpuops-agent"},
        "commonAnnotations": {"runbook_id": "gpu-fell-off-bus"},
        "externalURL": "http://alertmanager:9093", "alerts": alerts
    })
    .to_string()
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let idx = ((p / 100.0) * (v.len() as f64 - 1.0)).round() as usize;
    v[idx.min(v.len() - 1)]
}

async fn post(client: &reqwest::Client, url: &str, body: String) -> f64 {
    let t = Instant::now();
    let r = client
        .post(url)
        .bearer_auth("hook-token-s3cret")
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await;
    match r {
        Ok(r) if r.status() == 200 => t.elapsed().as_secs_f64() * 1000.0,
        Ok(r) => panic!("webhook answered {}", r.status()),
        Err(e) => panic!("webhook failed: {e}"),
    }
}

fn main() {
    // `cargo test --all-targets` runs bench binaries without `--bench`: skip.
    if !std::env::args().any(|a| a == "--bench") {
        println!("webhook benchmark: run it with `cargo bench --bench webhook`");
        return;
    }
    gpuops::telemetry::init("gpuops-bench", false, "warn");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

async fn run() {
    let secs = env_or("BENCH_SECS", 10.0);
    let rate = env_or("BENCH_RATE", 5000.0);
    let concurrency = env_or("BENCH_CONCURRENCY", 8.0) as usize;
    let dir = match std::env::var("BENCH_DIR") {
        Ok(d) => tempfile::tempdir_in(d).unwrap(),
        Err(_) => tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap(),
    };
    let slack = FakeApi::slack().await;
    let discord = FakeApi::discord().await;
    // Only Slack destinations, so every webhook makes exactly one chat call.
    let text = support::bot_config(dir.path(), &slack, &discord, "")
        .replace("discord_channel = \"1001\"\n", "")
        .replace("discord_channel = \"3003\"\n", "")
        .replace("level = \"info\"", "level = \"warn\"")
        .replace(
            "[store]\n",
            &format!(
                "[store]\nsync = \"{}\"\n",
                std::env::var("BENCH_SYNC").unwrap_or_else(|_| "full".into())
            ),
        );
    let cfg = Arc::new(BotConfig::from_str(Path::new("bench.toml"), &text).unwrap());
    let pg_url = match std::env::var("BENCH_POSTGRES_URL") {
        Ok(admin) => Some(gpuops::store::pg::fresh_schema_url(&admin).await.unwrap()),
        Err(_) => None,
    };
    let replicas = match &pg_url {
        Some(_) => env_or("BENCH_REPLICAS", 1.0) as usize,
        None => 1,
    };
    println!(
        "store: {}, {replicas} replica(s)",
        if pg_url.is_some() {
            "PostgreSQL"
        } else {
            "SQLite"
        }
    );
    let mut urls = Vec::new();
    let mut states = Vec::new();
    let mut stops = Vec::new();
    for _ in 0..replicas {
        let store = match &pg_url {
            Some(u) => gpuops::store::pg::open_url(u).await.unwrap(),
            None => Store::open_with(&cfg.store.path, cfg.store.sync).unwrap(),
        };
        let (state, worker) = BotState::new(cfg.clone(), store.clone()).unwrap();
        tokio::spawn(worker.run(std::future::pending()));
        if let Some(pg) = store.pg() {
            let outbox = state.outbox.clone();
            let (stop, rx) = tokio::sync::watch::channel(false);
            stops.push(stop);
            pg.spawn_listener(Arc::new(move || outbox.wake()), rx);
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        urls.push(format!(
            "http://{}/alertmanager",
            listener.local_addr().unwrap()
        ));
        let app = router(state.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        states.push(state);
    }
    let state = states[0].clone();
    let url = urls[0].clone();
    let client = reqwest::Client::new();
    // Warm up (connections, statement cache).
    for g in 0..5 {
        post(&client, &url, payload(1_000_000 + g, 0)).await;
    }
    slack.wait_for(5, Duration::from_secs(10)).await;

    // Phase 1: open loop at `rate` alerts/s.
    let webhooks = ((rate / ALERTS_PER_WEBHOOK as f64) * secs).round() as usize;
    let interval = Duration::from_secs_f64(secs / webhooks as f64);
    let bodies: Vec<String> = (0..webhooks).map(|g| payload(g, 0)).collect();
    let before = slack.requests().len();
    let start = Instant::now();
    let mut sent_at = Vec::with_capacity(webhooks);
    let mut tasks = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(interval);
    for (g, body) in bodies.into_iter().enumerate() {
        tick.tick().await;
        sent_at.push(Instant::now());
        let (client, url) = (client.clone(), urls[g % urls.len()].clone());
        tasks.spawn(async move { (g, post(&client, &url, body).await) });
    }
    let mut ack = Vec::with_capacity(webhooks);
    while let Some(r) = tasks.join_next().await {
        ack.push(r.unwrap().1);
    }
    let phase1 = start.elapsed().as_secs_f64();
    let reqs = slack
        .wait_for(before + webhooks, Duration::from_secs(120))
        .await;
    let mut chat = Vec::with_capacity(webhooks);
    for r in &reqs[before..] {
        let name = r.raw.split("Bench").nth(1).unwrap_or("");
        let digits: String = name.chars().take_while(|c| c.is_ascii_digit()).collect();
        if let Ok(g) = digits.parse::<usize>() {
            if g < webhooks {
                chat.push((r.at - sent_at[g]).as_secs_f64() * 1000.0);
            }
        }
    }
    println!(
        "phase 1 (open loop): {webhooks} webhooks x {ALERTS_PER_WEBHOOK} alerts in {phase1:.2}s = {:.0} alerts/s offered",
        (webhooks * ALERTS_PER_WEBHOOK) as f64 / phase1
    );
    println!(
        "  ack latency (sent -> 200 after commit): p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
        percentile(&mut ack, 50.0),
        percentile(&mut ack, 99.0),
        percentile(&mut ack, 100.0)
    );
    println!(
        "  alert-to-chat-call latency (sent -> fake Slack receives chat.postMessage): p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms  ({} calls)",
        percentile(&mut chat, 50.0),
        percentile(&mut chat, 99.0),
        percentile(&mut chat, 100.0),
        chat.len()
    );

    // Phase 2: closed loop, as fast as `concurrency` clients can go.
    let bodies: Arc<Vec<String>> = Arc::new((0..64).map(|g| payload(2_000_000 + g, 0)).collect());
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..concurrency {
        let (client, url, bodies) = (client.clone(), urls[c % urls.len()].clone(), bodies.clone());
        tasks.spawn(async move {
            let mut lat = Vec::new();
            let mut round = 1 + c * 1_000_000;
            while Instant::now() < deadline {
                // A new state of one of 64 groups each time (no duplicates).
                let body = bodies[round % 64].replace(
                    "2026-01-01T00:00:00Z",
                    &format!(
                        "2026-01-01T{:02}:{:02}:{:02}Z",
                        (round / 3600) % 24,
                        (round / 60) % 60,
                        round % 60
                    ),
                );
                let body = body.replace(
                    "\"truncatedAlerts\":0",
                    &format!("\"truncatedAlerts\":{round}"),
                );
                lat.push(post(&client, &url, body).await);
                round += 1;
            }
            lat
        });
    }
    let mut lat = Vec::new();
    while let Some(r) = tasks.join_next().await {
        lat.extend(r.unwrap());
    }
    let elapsed = start.elapsed().as_secs_f64();
    println!(
        "phase 2 (closed loop, {concurrency} clients): {} webhooks = {:.0} alerts/s sustained; ack p50 {:.2} ms  p99 {:.2} ms",
        lat.len(),
        (lat.len() * ALERTS_PER_WEBHOOK) as f64 / elapsed,
        percentile(&mut lat, 50.0),
        percentile(&mut lat, 99.0)
    );
    let pending = state.store.pending().await.unwrap();
    println!("  outbox pending at the end: {pending} (drained by the worker afterwards)");
}
