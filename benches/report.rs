//! A daily health report for a simulated 1,000-node, 8,000-GPU fleet: the
//! day's utilization and memory series (one sample every `BENCH_STEP`
//! seconds, default 300) are written as OpenMetrics, backfilled into a real
//! Prometheus with promtool (not timed), and the report is computed and
//! rendered (queries, store, three charts) the way the bot does it. Prints
//! the time of each run and this process's peak RSS; the target is < 10 s.
//!
//! `cargo bench --bench report` (needs promtool and prometheus);
//! `BENCH_NODES`, `BENCH_GPUS`, `BENCH_STEP`, `BENCH_RUNS` change the fleet;
//! `BENCH_QUERY_TIMES=1` also times each query alone.
//!
//! Measured on the 2-core development VM (load average about 5 from other
//! work), Prometheus 2.42: 1,000 nodes, 8,000 GPUs, 5-minute samples
//! (666 MiB of OpenMetrics, backfilled in 52 s), 10 nodes that stopped:
//! median 4.7 s per report (the slowest queries: GPU memory 1.0 s, idle
//! GPU-hours 0.9 s), peak RSS of this process 20 MiB.
#![allow(clippy::disallowed_methods)] // starts promtool and prometheus

#[path = "../tests/it/support/mod.rs"]
mod support;

#[path = "../tests/it/report_support/mod.rs"]
mod report_support;

use std::time::Instant;

use chrono::DateTime;
use gpuops::config::BotConfig;
use gpuops::report::{build, Inputs};
use gpuops::store::Store;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn main() {
    // `cargo test --all-targets` runs benches without `--bench`: skip the
    // minutes of backfill there unless a fleet size is asked for.
    if !std::env::args().any(|a| a == "--bench") && std::env::var_os("BENCH_NODES").is_none() {
        eprintln!("report bench: run with cargo bench --bench report");
        return;
    }
    let (nodes, gpus) = (env("BENCH_NODES", 1000), env("BENCH_GPUS", 8));
    let step = env("BENCH_STEP", 300) as i64;
    let runs = env("BENCH_RUNS", 3);
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("fleet.om");
    let t = Instant::now();
    {
        let mut f = std::fs::File::create(&file).expect("history file");
        report_support::large_fleet(nodes, gpus, step, &mut f).expect("write history");
    }
    let size = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "history: {nodes} nodes x {gpus} GPUs, a sample every {step} s: {} MiB of OpenMetrics in {:.1} s",
        size >> 20,
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    let prom = report_support::backfill_and_start(&file, dir.path());
    let _ = std::fs::remove_file(&file);
    eprintln!(
        "backfilled and started Prometheus in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let text = format!(
        "[store]\npath = \"{}\"\n[slack]\nbot_token = \"x\"\n[prometheus]\nurl = \"{}\"\n[[reports]]\nname = \"daily\"\nschedule = \"0 9 * * *\"\ntimezone = \"Europe/Berlin\"\nslack_channel = \"C1\"\nquery_timeout = \"60s\"\n",
        dir.path().join("bot.db").display(),
        prom.url
    );
    let path = dir.path().join("bot.toml");
    let cfg = BotConfig::from_str(&path, &text).expect("config");
    let store = Store::open(&cfg.store.path).expect("store");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let at = DateTime::from_timestamp(report_support::AT, 0).expect("time");
    let mut times = Vec::new();
    for run in 0..runs {
        let t = Instant::now();
        let built = rt.block_on(build(Inputs {
            config: &cfg.reports[0],
            prometheus_url: &prom.url,
            store: Some(&store),
            at,
            late: false,
            agent_events: None,
            names: &gpuops::inventory::NodeNames::default(),
            lifecycle: &Default::default(),
        }));
        let secs = t.elapsed().as_secs_f64();
        times.push(secs);
        assert!(built.failures.is_empty(), "{:#?}", built.failures);
        eprintln!(
            "run {run}: {secs:.2} s, {} findings, idle GPU-hours {:?}, {} charts ({} KiB)",
            built.findings,
            built.figures.idle_gpu_hours_total,
            built.message.charts.len(),
            built
                .message
                .charts
                .iter()
                .map(|c| c.png.len())
                .sum::<usize>()
                >> 10
        );
    }
    if std::env::var_os("BENCH_QUERY_TIMES").is_some() {
        // Each query alone, slowest first: where the time goes.
        let prom_client =
            gpuops::report::prom::Prometheus::new(&prom.url, std::time::Duration::from_secs(120))
                .expect("client");
        let mut each: Vec<(f64, &str)> = Vec::new();
        for q in gpuops::report::queries::ALL {
            let t = Instant::now();
            let r = rt.block_on(prom_client.instant(&q.render(86_400), report_support::AT as f64));
            each.push((t.elapsed().as_secs_f64(), q.id));
            if let Err(e) = r {
                eprintln!("{}: {e}", q.id);
            }
        }
        each.sort_by(|a, b| b.0.total_cmp(&a.0));
        for (secs, id) in each {
            eprintln!("  {secs:6.2} s  {id}");
        }
    }
    times.sort_by(f64::total_cmp);
    println!(
        "report (daily, {nodes} nodes, {} GPUs): median {:.2} s, max {:.2} s, peak RSS of this process {} MiB",
        nodes * gpus,
        times[times.len() / 2],
        times[times.len() - 1],
        peak_rss_kib() >> 10
    );
}
