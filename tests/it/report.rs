//! Scheduled health reports end to end: a day of known history backfilled
//! into a real Prometheus and a seeded store give exact numbers; the
//! preview command writes Markdown, HTML and PNGs that decode; a report
//! with Prometheus down still renders and names the failure; the schedule
//! claims each slot once across processes and restarts, and sends a missed
//! slot once, marked late.
#![allow(clippy::disallowed_methods)] // runs the real binary

use crate::paging_support;
use crate::report_support;
use crate::support;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use chrono::DateTime;
use gpuops::config::BotConfig;
use gpuops::inventory::NodeNames;
use gpuops::notify::console::ConsoleNotifier;
use gpuops::outbox::Notifiers;
use gpuops::report::{build, Inputs, Outcome};
use gpuops::store::Store;
use report_support::{AT, DAY, HOUR, NODE_A, NODE_B, NODE_C};

fn config(dir: &Path, prometheus: &str, extra: &str) -> Arc<BotConfig> {
    let text = format!(
        r#"
[store]
path = "{store}"
[slack]
bot_token = "xoxb-test"
api_url = "http://127.0.0.1:1/api"
[prometheus]
url = "{prometheus}"
[[reports]]
name = "daily"
schedule = "0 9 * * *"
timezone = "Europe/Berlin"
slack_channel = "C0REPORTS"
{extra}
[[reports.checks]]
name = "GPU memory total"
query = "sum(gpu_memory_total_bytes)"
unit = "bytes"
warn_below = 1e12
"#,
        store = dir.join("bot.db").display()
    );
    let path = dir.join("bot.toml");
    std::fs::write(&path, &text).unwrap();
    std::fs::set_permissions(
        &path,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600),
    )
    .unwrap(); // holds inline secrets
    Arc::new(BotConfig::from_str(&path, &text).unwrap())
}

/// Three alert groups with known times: MTTA (300 s + 900 s) / 2 = 10m,
/// MTTR (1 h + 3 h) / 2 = 2h; one P3 still firing.
fn seed_store(store: &Store) {
    let s = (AT - DAY) as f64;
    let groups = [
        (
            1,
            "P1",
            "resolved",
            "GPUFellOffBus",
            s + 3600.0,
            s + 7200.0,
            Some(s + 3630.0),
            Some(s + 3930.0),
        ),
        (
            2,
            "P2",
            "resolved",
            "GPUXIDMemory",
            s + 36_000.0,
            s + 46_800.0,
            Some(s + 36_000.0),
            Some(s + 36_900.0),
        ),
        (
            3,
            "P3",
            "firing",
            "StorageFillingUp",
            s + 72_000.0,
            s + 72_000.0,
            Some(s + 72_010.0),
            None,
        ),
    ];
    store
        .sqlite()
        .expect("the report tests seed a SQLite store")
        .write_blocking(move |c| {
            for (id, tier, status, name, first, updated, notified, ack) in groups {
                let state = format!(r#"{{"alerts":[{{"status":"{status}","labels":{{"alertname":"{name}"}}}}]}}"#);
                c.execute(
                    "INSERT INTO alert_groups(id, group_key, receiver, status, tier, rev, state_hash, recent_hashes, state, first_seen, updated_at)
                     VALUES (?1, ?2, 'gpuops', ?3, ?4, 1, 'h', '[]', ?5, ?6, ?7)",
                    rusqlite::params![id, format!("g{id}"), status, tier, state, first, updated],
                )?;
                if let Some(n) = notified {
                    c.execute(
                        "INSERT INTO messages(group_id, destination, channel, message_id, rev, posted_at, updated_at)
                         VALUES (?1, 'slack:C1', 'C1', 'm', 1, ?2, ?2)",
                        rusqlite::params![id, n],
                    )?;
                }
                if let Some(a) = ack {
                    c.execute(
                        "INSERT INTO acks(group_id, who, at) VALUES (?1, 'slack:U1', ?2)",
                        rusqlite::params![id, a],
                    )?;
                }
            }
            Ok(())
        })
        .unwrap();
}

fn decode_png(bytes: &[u8]) -> (u32, u32) {
    let dec = png::Decoder::new(std::io::Cursor::new(bytes));
    let r = dec.read_info().expect("a PNG");
    let info = r.info();
    (info.width, info.height)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs prometheus and promtool: run by .ci/run"]
async fn backfilled_report_numbers_match_the_history() {
    let dir = tempfile::tempdir().unwrap();
    let prom = tokio::task::block_in_place(|| report_support::small_fleet_prometheus(dir.path()));
    let cfg = config(dir.path(), &prom.url, "");
    let store = Store::open(&cfg.store.path).unwrap();
    seed_store(&store);
    let report = &cfg.reports[0];
    let at = DateTime::from_timestamp(AT, 0).unwrap();
    let built = build(Inputs {
        config: report,
        prometheus_url: &prom.url,
        store: Some(&store),
        at,
        late: false,
        agent_events: None,
        names: &NodeNames::default(),
        lifecycle: &Default::default(),
    })
    .await;
    let f = &built.figures;
    assert!(built.failures.is_empty(), "{:#?}", built.failures);
    assert_eq!(built.outcome, Outcome::Sent);
    assert_eq!((f.nodes_now, f.nodes_seen), (Some(2), Some(3)));
    assert_eq!(
        f.nodes_stopped,
        vec![(NODE_C.to_string(), (AT - DAY + 16 * HOUR) as f64)]
    );
    assert_eq!(f.gpus_dropped, vec![(NODE_B.to_string(), 1)]);
    assert_eq!(f.gpus_missing, vec![(NODE_B.to_string(), "1".to_string())]);
    assert_eq!(
        f.xids_by_code
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect::<Vec<_>>(),
        vec![(48, 2), (79, 1)]
    );
    let xids: Vec<(&str, &str, u32, u64)> = f
        .xids
        .iter()
        .map(|x| (x.node.as_str(), x.gpu.as_str(), x.code, x.count))
        .collect();
    assert_eq!(xids, vec![(NODE_A, "2", 48, 2), (NODE_B, "1", 79, 1)]);
    assert_eq!(
        f.idle_gpu_hours,
        vec![(NODE_A.to_string(), 29), (NODE_B.to_string(), 4)]
    );
    assert_eq!(f.idle_gpu_hours_total, Some(33));
    assert_eq!(f.oom_kills, vec![(NODE_A.to_string(), 3)]);
    assert_eq!(f.filesystems.len(), 1, "{:?}", f.filesystems);
    let fs = &f.filesystems[0];
    assert_eq!(
        (fs.node.as_str(), fs.mountpoint.as_str()),
        (NODE_A, "/data")
    );
    assert!((fs.used_ratio - 0.82).abs() < 1e-9, "{}", fs.used_ratio);
    let days = fs.days_to_full.expect("growing");
    assert!((days - 2.5).abs() < 1e-6, "{days}");
    assert_eq!(f.mtta_secs, Some(600.0));
    assert_eq!(f.mttr_secs, Some(7200.0));
    assert_eq!(f.still_firing, Some(1));
    assert_eq!(
        f.alerts_by_tier
            .iter()
            .map(|(k, v)| (k.as_str(), *v))
            .collect::<Vec<_>>(),
        vec![("P1", 1), ("P2", 1), ("P3", 1)]
    );

    let md = &built.markdown;
    assert!(
        md.starts_with("# Daily health report: 27 Nov 09:00 – 28 Nov 09:00 (Europe/Berlin)"),
        "{md}"
    );
    for needle in [
        "**10.0.0.3:9949** stopped reporting (last seen [28 Nov 01:00](",
        "**10.0.0.2:9949** GPU 1 fell off the bus: XID 79 ×[1](",
        "GPUs [2 → 1](",
        "**10.0.0.1:9949** GPU 2: XID 48 ×[2](",
        "(runbook `gpu-fell-off-bus`)",
        "full in [2.5 days](",
        "Idle GPU-hours (whole hours under 5 % utilization): [33](",
        "MTTA (first notification → acknowledgement): 10m over 2 acknowledged groups of 3; MTTR (firing → resolved): 2h over 2 resolved groups of 3; 1 still open",
        "**GPU memory total**: [372.5 GiB](",
        "/graph?g0.expr=",
    ] {
        assert!(md.contains(needle), "{needle:?} not in:\n{md}");
    }
    // Every number in a finding is a link: the summary's first finding is critical.
    assert!(
        built.message.summary[1].starts_with("🔴 critical: "),
        "{:?}",
        built.message.summary
    );
    let files: Vec<&str> = built
        .message
        .charts
        .iter()
        .map(|c| c.file_name.as_str())
        .collect();
    assert_eq!(
        files,
        vec![
            "fleet-gpu-utilization.png",
            "idle-gpu-hours.png",
            "gpu-errors-per-node.png"
        ]
    );
    for c in &built.message.charts {
        let (w, h) = decode_png(&c.png);
        assert!(w >= 800 && h >= 400, "{}: {w}x{h}", c.file_name);
        assert!(built
            .message
            .html
            .contains(&format!("src=\"cid:{}\"", c.file_name)));
    }
    if let Ok(out) = std::env::var("GPUOPS_REPORT_EXAMPLE") {
        let c = &built.message.charts[0];
        std::fs::write(
            Path::new(&out).join("report-example-utilization.png"),
            &c.png,
        )
        .unwrap();
        std::fs::write(
            Path::new(&out).join("report-example-errors.png"),
            &built.message.charts[2].png,
        )
        .unwrap();
    }

    // The command a user runs writes the same report into files.
    let out = dir.path().join("preview");
    let run = Command::new(env!("CARGO_BIN_EXE_gpuops"))
        .args([
            "report",
            "preview",
            "--name",
            "daily",
            "--at",
            "2025-11-28T09:00:00+01:00",
        ])
        .arg("--config")
        .arg(dir.path().join("bot.toml"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("XIDs by code: [48 ×2, 79 ×1]("), "{md}");
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains("<img src=\"idle-gpu-hours.png\""), "{html}");
    assert!(!html.contains("cid:"));
    for f in [
        "fleet-gpu-utilization.png",
        "idle-gpu-hours.png",
        "gpu-errors-per-node.png",
    ] {
        let (w, _) = decode_png(&std::fs::read(out.join(f)).unwrap());
        assert_eq!(w, gpuops::report::chart::WIDTH);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_with_prometheus_down_still_renders_naming_the_failure() {
    let dir = tempfile::tempdir().unwrap();
    let down = format!("http://127.0.0.1:{}", report_support::free_port());
    let cfg = config(dir.path(), &down, "");
    let store = Store::open(&cfg.store.path).unwrap();
    seed_store(&store);
    let built = build(Inputs {
        config: &cfg.reports[0],
        prometheus_url: &down,
        store: Some(&store),
        at: DateTime::from_timestamp(AT, 0).unwrap(),
        late: false,
        agent_events: None,
        names: &NodeNames::default(),
        lifecycle: &Default::default(),
    })
    .await;
    assert_eq!(built.outcome, Outcome::Partial);
    assert!(built
        .failures
        .iter()
        .any(|f| f.starts_with("GPU health: XID errors in the period, by node, GPU and code (XIDS): Prometheus unreachable at http://127.0.0.1:")),
        "{:#?}", built.failures);
    assert!(built
        .failures
        .iter()
        .any(|f| f.starts_with("Checks: check \"GPU memory total\"")));
    let md = &built.markdown;
    assert!(
        md.contains(
            "5 of 6 sections not computed (Fleet, GPU health, Utilization and waste, Host, Checks)"
        ),
        "{md}"
    );
    // The store's section is still there.
    assert!(
        md.contains("MTTA (first notification → acknowledgement): 10m"),
        "{md}"
    );
    assert!(built.message.charts.is_empty());
    assert!(built.message.text.contains("Could not compute"));
    assert!(built.message.summary[0].contains("⚠ incomplete"));
}

/// Every rendering a person reads of a built report: Markdown, the
/// summary lines, email text and HTML, the preview HTML, Slack's message
/// (blocks and fallback text) and Discord's.
fn every_rendering(built: &gpuops::report::Built) -> Vec<(&'static str, String)> {
    let message = gpuops::message::Message::Report(Box::new(built.message.clone()));
    let discord = gpuops::notify::discord::render(&message);
    vec![
        ("markdown", built.markdown.clone()),
        ("summary", built.message.summary.join("\n")),
        ("email text", built.message.text.clone()),
        ("email html", built.message.html.clone()),
        ("preview html", built.preview_html.clone()),
        (
            "slack",
            serde_json::to_string(&gpuops::notify::slack::report::content(&built.message)).unwrap(),
        ),
        (
            "discord",
            format!(
                "{} {}",
                discord.content,
                serde_json::to_string(&discord.embed).unwrap()
            ),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_with_prometheus_down_never_says_no_findings() {
    let dir = tempfile::tempdir().unwrap();
    let down = format!("http://127.0.0.1:{}", report_support::free_port());
    let cfg = config(dir.path(), &down, "");
    // The store answers (nothing happened in it); Prometheus does not.
    let store = Store::open(&cfg.store.path).unwrap();
    let names = NodeNames::default();
    let inputs = |store| Inputs {
        config: &cfg.reports[0],
        prometheus_url: &down,
        store,
        at: DateTime::from_timestamp(AT, 0).unwrap(),
        late: false,
        agent_events: None,
        names: &names,
        lifecycle: &cfg.lifecycle,
    };
    let built = build(inputs(Some(&store))).await;
    assert_eq!(built.outcome, Outcome::Partial);
    let headline = &built.message.summary[0];
    assert!(
        headline.starts_with(&format!(
            "**⚠ incomplete**: Prometheus unreachable at {down} (connection refused): 5 of 6 sections not computed (Fleet, GPU health, Utilization and waste, Host, Checks)"
        )),
        "{:#?}",
        built.message.summary
    );
    for (what, text) in every_rendering(&built) {
        assert!(
            !text.contains("No findings") && !text.contains("nothing needs attention"),
            "{what} reads as an all-clear:\n{text}"
        );
        assert!(
            text.contains("incomplete") && text.contains("Prometheus unreachable"),
            "{what} does not say it is incomplete:\n{text}"
        );
    }

    // Nothing answers: the report is `failed` and says it cannot tell.
    let built = build(inputs(None)).await;
    assert_eq!(built.outcome, Outcome::Failed);
    assert!(
        built.message.summary[0].starts_with("**⚠ not computed**: Prometheus unreachable at"),
        "{:#?}",
        built.message.summary
    );
    assert!(built.message.summary[0].contains("none of the 6 sections could be computed"));
    for (what, text) in every_rendering(&built) {
        assert!(
            !text.contains("No findings") && !text.contains("nothing needs attention"),
            "{what} reads as an all-clear:\n{text}"
        );
    }

    // `report preview` says so and exits 3 (not computed); no store file.
    let cfg_path = dir.path().join("bot.toml");
    drop(store);
    std::fs::remove_file(&cfg.store.path).unwrap();
    let out_dir = dir.path().join("preview");
    let run = Command::new(env!("CARGO_BIN_EXE_gpuops"))
        .args(["report", "preview", "--name", "daily"])
        .args(["--at", "2025-11-28T09:00:00+01:00"])
        .arg("--config")
        .arg(&cfg_path)
        .arg("--out")
        .arg(&out_dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(
        run.status.code(),
        Some(gpuops::report::cli::EXIT_NOT_COMPUTED as i32),
        "{stderr}"
    );
    assert!(
        stderr.contains("gpuops: ⚠ not computed: Prometheus unreachable"),
        "{stderr}"
    );
    assert!(stderr.contains("outcome failed"), "{stderr}");
    let html = std::fs::read_to_string(out_dir.join("report.html")).unwrap();
    assert!(!html.contains("No findings"), "{html}");
}

/// `(labels, value)` rows of a fake Prometheus answer.
type Rows = Vec<report_support::Series>;

fn answer(q: &gpuops::report::queries::Query, rows: Rows) -> (String, Rows) {
    (q.render(DAY as u64), rows)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_gpu_is_one_finding_with_its_evidence() {
    use gpuops::report::queries as q;
    let dir = tempfile::tempdir().unwrap();
    const B: &str = "10.0.0.2:9949";
    let gpu5 = vec![
        ("instance", B),
        ("gpu", "5"),
        ("uuid", "GPU-3f2a1b2c-8d9e-4f00-9a1b-2c3d4e5f6a7b"),
    ];
    let prom = report_support::fake_prometheus(vec![
        answer(&q::NODES_NOW, vec![(vec![], 2.0)]),
        answer(&q::NODES_SEEN, vec![(vec![], 2.0)]),
        answer(&q::GPUS_DROPPED, vec![(vec![("instance", B)], 1.0)]),
        answer(&q::GPUS_MOST, vec![(vec![("instance", B)], 8.0)]),
        answer(&q::GPUS_MISSING, vec![(gpu5.clone(), 1.0)]),
        answer(&q::GPUS_DOWN, vec![(gpu5.clone(), 0.0)]),
        answer(
            &q::XIDS,
            vec![(
                [
                    gpu5.clone(),
                    vec![("pci_bus_id", "00000000:C1:00.0"), ("xid", "79")],
                ]
                .concat(),
                1.0,
            )],
        ),
    ])
    .await;
    let cfg = config(
        dir.path(),
        &prom,
        &format!("sections = [\"fleet\", \"gpu_health\", \"incidents\"]\n[agents]\n[[agents.nodes]]\ninstance = \"{B}\"\nnode = \"gpu-node-3\"\n"),
    );
    // GPUFellOffBus and GPUDown for that GPU, still firing as two P1 groups.
    let store = Store::open(&cfg.store.path).unwrap();
    store
        .sqlite()
        .expect("a SQLite store")
        .write_blocking(|c| {
            for (id, name) in [(1, "GPUFellOffBus"), (2, "GPUDown")] {
                let state = format!(
                    r#"{{"alerts":[{{"status":"firing","labels":{{"alertname":"{name}","instance":"{B}","gpu":"5"}}}}]}}"#
                );
                c.execute(
                    "INSERT INTO alert_groups(id, group_key, receiver, status, tier, rev, state_hash, recent_hashes, state, first_seen, updated_at)
                     VALUES (?1, ?2, 'gpuops', 'firing', 'P1', 1, 'h', '[]', ?3, ?4, ?4)",
                    rusqlite::params![id, format!("g{id}"), state, (AT - HOUR) as f64],
                )?;
            }
            Ok(())
        })
        .unwrap();
    let names = gpuops::inventory::Identity::from_config(&cfg).names().await;
    let built = build(Inputs {
        config: &cfg.reports[0],
        prometheus_url: &prom,
        store: Some(&store),
        at: DateTime::from_timestamp(AT, 0).unwrap(),
        late: false,
        agent_events: None,
        names: &names,
        lifecycle: &Default::default(),
    })
    .await;
    assert!(built.failures.is_empty(), "{:#?}", built.failures);
    assert_eq!(built.findings, 1, "{}", built.markdown);
    let summary = &built.message.summary;
    assert_eq!(
        summary[0], "**1 finding** (1 critical, 0 warnings)",
        "{summary:#?}"
    );
    let line = &summary[1];
    for needle in [
        "🔴 critical: **gpu-node-3** (10.0.0.2:9949) GPU 5 (GPU-3f2a1b2c) fell off the bus: XID 79 ×[1](",
        "GPUs [8 → 7](",
        "[stopped reporting](",
        "`gpu_up` [0](",
        "runbook `gpu-fell-off-bus`",
    ] {
        assert!(line.contains(needle), "{needle:?} not in {line}");
    }
    // Issue 22, observation 1: the lost GPU's action is the catalogue's XID 79
    // one (drain, reboot, BMC power cycle), never "reset or reseat the GPU".
    assert_eq!(gpuops::gpu::xid::disagreement(79, line), None, "{line}");
    // The XID still counts in GPU health's totals, without a finding of its own.
    assert!(
        built.markdown.contains("XIDs by code: [79 ×1]("),
        "{}",
        built.markdown
    );
    assert_eq!(built.figures.lost_gpus.len(), 1);
    // Its alerts are listed as that GPU's, not as more findings.
    for name in ["GPUFellOffBus", "GPUDown"] {
        assert!(
            built.markdown.contains(&format!(
                "Still firing: **{name}** on **gpu-node-3** GPU 5 (P1, group "
            )),
            "{}",
            built.markdown
        );
    }
    assert!(
        built
            .markdown
            .contains("not acknowledged): see `gpuops audit --group 2 --markdown`: the lost GPU of **gpu-node-3** GPU 5 (Fleet)"),
        "{}",
        built.markdown
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_lines_name_the_node_with_its_instance_beside_it() {
    use gpuops::report::queries as q;
    let dir = tempfile::tempdir().unwrap();
    let prom = report_support::fake_prometheus(vec![
        answer(
            &q::ECC_UNCORRECTED,
            vec![(
                vec![
                    ("instance", "10.0.0.1:9949"),
                    ("gpu", "1"),
                    ("uuid", "GPU-aaaabbbb-cccc-dddd-eeee-ffff00001111"),
                ],
                3.0,
            )],
        ),
        answer(
            &q::XIDS,
            vec![
                // In the inventory.
                (
                    vec![("instance", "10.0.0.1:9949"), ("gpu", "2"), ("xid", "48")],
                    2.0,
                ),
                // Not in it: the DNS host part.
                (
                    vec![
                        ("instance", "gpu-node-9.dc1.example:9949"),
                        ("gpu", "0"),
                        ("xid", "31"),
                    ],
                    1.0,
                ),
                // An XID on a PCI bus where no GPU is known: no empty GPU.
                (
                    vec![
                        ("instance", "10.0.0.7:9949"),
                        ("pci_bus_id", "00000000:C1:00.0"),
                        ("xid", "31"),
                    ],
                    1.0,
                ),
            ],
        ),
    ])
    .await;
    let cfg = config(
        dir.path(),
        &prom,
        "sections = [\"gpu_health\"]\n[agents]\n[[agents.nodes]]\ninstance = \"10.0.0.1:9949\"\nnode = \"gpu-node-1\"\n",
    );
    let names = gpuops::inventory::Identity::from_config(&cfg).names().await;
    let built = build(Inputs {
        config: &cfg.reports[0],
        prometheus_url: &prom,
        store: None,
        at: DateTime::from_timestamp(AT, 0).unwrap(),
        late: false,
        agent_events: None,
        names: &names,
        lifecycle: &Default::default(),
    })
    .await;
    let md = &built.markdown;
    for needle in [
        "**gpu-node-1** (10.0.0.1:9949) GPU 2: XID 48 ×[2](",
        // The GPU's UUID prefix where a series carries it.
        "**gpu-node-1** (10.0.0.1:9949) GPU 1 (GPU-aaaabbbb): [3](",
        "**gpu-node-9** (gpu-node-9.dc1.example:9949) GPU 0: XID 31 ×[1](",
        "**10.0.0.7:9949** the PCI device 00000000:C1:00.0 (no GPU known at that address): XID 31 ×[1](",
    ] {
        assert!(md.contains(needle), "{needle:?} not in\n{md}");
    }
    assert!(!md.contains("GPU -") && !md.contains("GPU :"), "{md}");
    // The chart's bars are labelled by the same names.
    assert_eq!(built.figures.node_name("10.0.0.1:9949"), "gpu-node-1");
    assert_eq!(
        built.figures.node_name("gpu-node-9.dc1.example:9949"),
        "gpu-node-9"
    );
    assert_eq!(built.figures.node_name("10.0.0.7:9949"), "10.0.0.7:9949");
}

fn notifiers() -> Notifiers {
    Notifiers {
        slack: None,
        discord: None,
        webhook: None,
        console: Arc::new(ConsoleNotifier::new()),
        pagerduty: None,
        email: None,
    }
}

async fn a_slot_is_claimed_once_by_two_processes_and_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let down = format!("http://127.0.0.1:{}", report_support::free_port());
    let cfg = config(dir.path(), &down, "");
    let report = cfg.reports[0].clone();
    // Two bots on one database file (two processes' worth of connections).
    let (a, _wa) = gpuops::bot::state::BotState::with_notifiers(
        cfg.clone(),
        support::open_store_at(&cfg.store.path).await,
        notifiers(),
    );
    let (b, _wb) = gpuops::bot::state::BotState::with_notifiers(
        cfg.clone(),
        support::open_store_at(&cfg.store.path).await,
        notifiers(),
    );
    let t0 = (AT - 2 * HOUR) as f64;
    // First start: a baseline, nothing owed.
    assert_eq!(
        gpuops::report::schedule::run_once(&a, &report, t0, t0).await,
        None
    );
    // The 08:00 UTC slot (09:00 Berlin is 08:00 UTC in November) comes due: both race.
    let now = (AT + 30) as f64;
    let (ra, rb) = tokio::join!(
        gpuops::report::schedule::run_once(&a, &report, t0, now),
        gpuops::report::schedule::run_once(&b, &report, t0, now)
    );
    let claimed: Vec<_> = [ra, rb].into_iter().flatten().collect();
    assert_eq!(claimed, vec![(AT as f64, Outcome::Partial)]);
    assert_eq!(
        a.store.pending().await.unwrap(),
        1,
        "one delivery: one slot, one destination"
    );
    // A restart: a third open of the file sends nothing more for that slot.
    drop((a, b));
    let (c, _wc) = gpuops::bot::state::BotState::with_notifiers(
        cfg.clone(),
        support::open_store_at(&cfg.store.path).await,
        notifiers(),
    );
    assert_eq!(
        gpuops::report::schedule::run_once(&c, &report, now + 5.0, now + 10.0).await,
        None
    );
    let slots = c.store.report_slots("daily".into()).await.unwrap();
    assert_eq!(slots, vec![(AT as f64, false, "partial".to_string())]);
    assert_eq!(c.store.pending().await.unwrap(), 1);
    let body: gpuops::message::Message = serde_json::from_str(
        &c.store.due(f64::MAX, 10).await.unwrap()[0]
            .body
            .clone()
            .unwrap(),
    )
    .unwrap();
    let gpuops::message::Message::Report(r) = body else {
        panic!("not a report")
    };
    assert!(
        r.title
            .starts_with("Daily health report: 27 Nov 09:00 – 28 Nov 09:00 (Europe/Berlin)"),
        "{}",
        r.title
    );
    let metrics = prometheus::TextEncoder::new()
        .encode_to_string(&c.metrics.gather())
        .unwrap();
    assert!(
        !metrics.contains("gpuops_reports_total{"),
        "a fresh process counted nothing: {metrics}"
    );
}

async fn a_slot_missed_while_down_is_sent_once_and_marked_late() {
    let dir = tempfile::tempdir().unwrap();
    let down = format!("http://127.0.0.1:{}", report_support::free_port());
    let cfg = config(dir.path(), &down, "");
    let report = cfg.reports[0].clone();
    let (a, _w) = gpuops::bot::state::BotState::with_notifiers(
        cfg.clone(),
        support::open_store_at(&cfg.store.path).await,
        notifiers(),
    );
    let t0 = (AT - 3 * DAY) as f64;
    assert_eq!(
        gpuops::report::schedule::run_once(&a, &report, t0, t0).await,
        None
    );
    // Down for three days; started again at AT + 1h: only AT's slot, late.
    let started = (AT + HOUR) as f64;
    assert_eq!(
        gpuops::report::schedule::run_once(&a, &report, started, started).await,
        Some((AT as f64, Outcome::Partial))
    );
    assert_eq!(
        gpuops::report::schedule::run_once(&a, &report, started, started + 60.0).await,
        None
    );
    let slots = a.store.report_slots("daily".into()).await.unwrap();
    assert_eq!(slots, vec![(AT as f64, true, "partial".to_string())]);
    let body = a.store.due(f64::MAX, 10).await.unwrap()[0]
        .body
        .clone()
        .unwrap();
    let gpuops::message::Message::Report(r) = serde_json::from_str(&body).unwrap() else {
        panic!()
    };
    assert!(r.late && r.title.ends_with("[late]"), "{}", r.title);
    assert!(
        r.summary
            .iter()
            .any(|l| l.starts_with("Sent late: the bot was not running at 28 Nov 09:00")),
        "{:?}",
        r.summary
    );
    let metrics = prometheus::TextEncoder::new()
        .encode_to_string(&a.metrics.gather())
        .unwrap();
    assert!(
        metrics.contains(r#"gpuops_reports_total{name="daily",outcome="partial"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"gpuops_report_duration_seconds_count{name="daily"} 1"#),
        "{metrics}"
    );
}

async fn only_if_findings_claims_a_quiet_slot_without_sending() {
    let dir = tempfile::tempdir().unwrap();
    let down = format!("http://127.0.0.1:{}", report_support::free_port());
    let cfg = config(
        dir.path(),
        &down,
        "only_if_findings = true\nsections = [\"incidents\"]",
    );
    let report = cfg.reports[0].clone();
    let (a, _w) = gpuops::bot::state::BotState::with_notifiers(
        cfg.clone(),
        support::open_store_at(&cfg.store.path).await,
        notifiers(),
    );
    let t0 = (AT - 2 * HOUR) as f64;
    assert_eq!(
        gpuops::report::schedule::run_once(&a, &report, t0, t0).await,
        None
    );
    assert_eq!(
        gpuops::report::schedule::run_once(&a, &report, t0, AT as f64).await,
        Some((AT as f64, Outcome::Empty))
    );
    assert_eq!(a.store.pending().await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_send_delivers_through_the_outbox_and_fails_on_a_dead_letter() {
    let dir = tempfile::tempdir().unwrap();
    let slack = support::FakeApi::slack().await;
    let discord = support::FakeApi::discord().await;
    let down = format!("http://127.0.0.1:{}", report_support::free_port());
    let extra = format!(
        "[prometheus]\nurl = \"{down}\"\n[[reports]]\nname = \"daily\"\nschedule = \"0 9 * * *\"\ntimezone = \"Europe/Berlin\"\nslack_channel = \"CREPORTS\"\ndiscord_channel = \"2002\"\n"
    );
    let path = dir.path().join("bot.toml");
    std::fs::write(
        &path,
        support::bot_config(dir.path(), &slack, &discord, &extra),
    )
    .unwrap();
    std::fs::set_permissions(
        &path,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600),
    )
    .unwrap(); // holds inline secrets
    let send = |path: std::path::PathBuf| {
        tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_gpuops"))
                .args(["report", "send", "--name", "daily", "--timeout", "20s"])
                .args(["--at", "2025-11-28T09:00:00+01:00"])
                .arg("--config")
                .arg(path)
                .output()
                .unwrap()
        })
    };
    // A row of the bot's own outbox (a running bot delivers it): not ours to send.
    let bot_store = Store::open(&dir.path().join("bot.db")).unwrap();
    bot_store
        .enqueue_report(vec![gpuops::store::reports::ReportDelivery {
            destination: "slack:COTHER".into(),
            body: serde_json::to_string(&gpuops::message::Message::Text(
                gpuops::message::TextMessage::new("the bot's", None),
            ))
            .unwrap(),
        }])
        .await
        .unwrap();
    let out = send(path.clone()).await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Delivered, but Prometheus is down: not an all-clear, and the exit
    // status says so (3: not computed).
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("gpuops: ⚠ incomplete: Prometheus unreachable at http://127.0.0.1:"),
        "{stderr}"
    );
    assert!(
        !slack.requests().iter().any(|r| r.raw.contains("COTHER")),
        "the bot's row was left to the bot"
    );
    assert_eq!(bot_store.pending().await.unwrap(), 1);
    assert!(
        stderr.contains("2 delivered, 0 dead-lettered, 0 still pending"),
        "{stderr}"
    );
    assert!(
        slack
            .requests()
            .iter()
            .any(|r| r.raw.contains("CREPORTS") && r.raw.contains("Daily health report")),
        "{:?}",
        slack.requests()
    );
    assert!(
        discord
            .requests()
            .iter()
            .any(|r| r.path.contains("/channels/2002/")),
        "{:?}",
        discord.requests()
    );

    // Slack refuses the channel for good: a dead letter, and the command says so.
    slack.script((0..5).map(|_| {
        support::Scripted::new(
            200,
            serde_json::json!({"ok": false, "error": "channel_not_found"}),
        )
    }));
    let out = send(path.clone()).await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // 4: not delivered (before "not computed").
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("1 delivered, 1 dead-lettered"), "{stderr}");
    assert!(stderr.contains("dead letter: slack:CREPORTS"), "{stderr}");

    // Slack down past the deadline: what is left goes to the bot's outbox.
    slack.set_down(true);
    let quick = std::fs::read_to_string(&path).unwrap();
    let quick_path = dir.path().join("quick.toml");
    std::fs::write(&quick_path, quick).unwrap();
    std::fs::set_permissions(
        &quick_path,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600),
    )
    .unwrap(); // holds inline secrets
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_gpuops"))
            .args(["report", "send", "--name", "daily", "--timeout", "2s"])
            .arg("--config")
            .arg(quick_path)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(
        stderr.contains("1 still pending (1 handed to the bot's outbox)"),
        "{stderr}"
    );
    assert_eq!(bot_store.pending().await.unwrap(), 2);
}

/// The issue's "done when", as a new user would try it: a backfilled
/// Prometheus, `gpuops report send` to Slack (three-step upload into the
/// summary's thread), Discord (one multipart message with the charts
/// attached) and a real SMTP server (inline charts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs prometheus, promtool and python3-aiosmtpd: run by .ci/run"]
async fn report_send_posts_summary_and_charts_to_slack_discord_and_smtp() {
    let dir = tempfile::tempdir().unwrap();
    let prom = tokio::task::block_in_place(|| report_support::small_fleet_prometheus(dir.path()));
    let smtp = paging_support::Smtp::start(dir.path()).expect("python3-aiosmtpd is not installed");
    let slack = support::FakeApi::slack().await;
    let discord = support::FakeApi::discord().await;
    let extra = format!(
        "[prometheus]\nurl = \"{}\"\n[email]\nsmtp_url = \"smtp://127.0.0.1:{}\"\nfrom = \"gpuops <gpuops@example.com>\"\n[[reports]]\nname = \"daily\"\nschedule = \"0 9 * * *\"\ntimezone = \"Europe/Berlin\"\nslack_channel = \"CREPORTS\"\ndiscord_channel = \"2002\"\nemail = [\"ops@example.com\"]\n",
        prom.url, smtp.port
    );
    let path = dir.path().join("bot.toml");
    std::fs::write(
        &path,
        support::bot_config(dir.path(), &slack, &discord, &extra),
    )
    .unwrap();
    std::fs::set_permissions(
        &path,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600),
    )
    .unwrap(); // holds inline secrets
    let at = DateTime::from_timestamp(AT, 0).unwrap().to_rfc3339();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_gpuops"))
            .args([
                "report",
                "send",
                "--name",
                "daily",
                "--timeout",
                "30s",
                "--at",
                &at,
            ])
            .arg("--config")
            .arg(path)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("3 delivered, 0 dead-lettered, 0 still pending"),
        "{stderr}"
    );

    // Slack: the summary, then per chart getUploadURLExternal → upload →
    // completeUploadExternal into the summary's thread; never files.upload.
    let posts = slack.calls("chat.postMessage");
    assert_eq!(posts.len(), 1, "{posts:?}");
    assert!(
        posts[0].raw.contains("Daily health report"),
        "{}",
        posts[0].raw
    );
    let urls = slack.calls("files.getUploadURLExternal");
    let completes = slack.calls("files.completeUploadExternal");
    assert_eq!(urls.len(), 3, "three charts: {urls:?}");
    assert_eq!(completes.len(), 3);
    for c in &completes {
        assert!(
            c.raw.contains("CREPORTS") && c.raw.contains("thread_ts"),
            "{}",
            c.raw
        );
    }
    assert!(slack.calls("files.upload").is_empty());

    // Discord: one message with the embed and the three charts attached.
    let msgs: Vec<_> = discord
        .requests()
        .into_iter()
        .filter(|r| r.path.ends_with("/channels/2002/messages"))
        .collect();
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    let parts = support::multipart_parts(&msgs[0]);
    assert_eq!(
        parts
            .iter()
            .filter(|p| p.name.starts_with("files["))
            .count(),
        3,
        "{:?}",
        parts.iter().map(|p| &p.name).collect::<Vec<_>>()
    );

    // Email: a real SMTP server got the report with its charts inline.
    let mails = smtp.wait_for(1, std::time::Duration::from_secs(10)).await;
    assert!(mails[0].contains("Daily health report"), "{}", mails[0]);
    assert_eq!(
        mails[0].matches("Content-Type: image/png").count(),
        3,
        "{}",
        &mails[0][..mails[0].len().min(2000)]
    );
    assert!(mails[0].contains("Content-ID: <fleet-gpu-utilization.png>"));
}

// The schedule's exactly-once claims, on SQLite and on PostgreSQL.
on_both!(
    a_slot_is_claimed_once_by_two_processes_and_across_a_restart,
    a_slot_missed_while_down_is_sent_once_and_marked_late,
    only_if_findings_claims_a_quiet_slot_without_sending,
);
