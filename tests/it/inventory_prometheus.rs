//! The bot's agent inventory from a real Prometheus: the targets of the job
//! named by `[agents] prometheus_job`, with the node name from the target's
//! `node` label; a target that is only an IP address without that label, and
//! a target of another job, get no node steps.
// Integration tests start the real binaries; only the product is held to the
// no-spawn-outside-exec.rs rule.
#![allow(clippy::disallowed_methods)]

use crate::support::{free_port, wait_listening, Proc};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gpuops::config::BotConfig;
use gpuops::inventory::Inventory;

const PROMETHEUS: &str = "/usr/bin/prometheus";

fn start_prometheus(dir: &Path, agent: &str, unnamed: &str, other: &str) -> (Proc, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let cfg = format!(
        r#"global:
  scrape_interval: 1s
scrape_configs:
  - job_name: gpuops
    static_configs:
      - targets: ["{agent}"]
        labels:
          node: gpu-node-a
      - targets: ["{unnamed}"]
  - job_name: node
    static_configs:
      - targets: ["{other}"]
"#
    );
    std::fs::write(dir.join("prometheus.yml"), cfg).unwrap();
    let child = Command::new(PROMETHEUS)
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address={addr}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start /usr/bin/prometheus");
    let p = Proc(child);
    wait_listening(&addr, "prometheus");
    (p, format!("http://{addr}"))
}

#[tokio::test]
#[ignore = "needs /usr/bin/prometheus; run by .ci/run"]
async fn inventory_reads_the_agents_job_from_prometheus() {
    let dir = tempfile::tempdir().unwrap();
    let agent = format!("127.0.0.1:{}", free_port());
    let _agent = Proc(
        Command::new(env!("CARGO_BIN_EXE_gpuops"))
            .args(["agent", "--listen", &agent])
            .env_remove("GPUOPS_AGENT_CONFIG")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_listening(&agent, "the agent");
    let unnamed = format!("127.0.0.1:{}", free_port());
    let other = format!("127.0.0.1:{}", free_port());
    let (_prom, url) = start_prometheus(dir.path(), &agent, &unnamed, &other);
    let text = format!(
        "[prometheus]\nurl = \"{url}\"\n[agents]\nprometheus_job = \"gpuops\"\nrefresh_secs = 1\n"
    );
    let cfg = BotConfig::from_str(&dir.path().join("bot.toml"), &text).unwrap();
    let inv = Inventory::from_config(&cfg).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match inv.refresh_now().await {
            Ok(n) if n >= 1 => break,
            got => {
                assert!(Instant::now() < deadline, "targets never appeared: {got:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let a = inv.lookup(&agent).await.unwrap();
    assert_eq!(a.node, "gpu-node-a");
    assert_eq!(a.url, format!("http://{agent}"));
    let e = inv.lookup(&unnamed).await.unwrap_err();
    assert!(
        e.contains("has no node name") && e.contains("IP address"),
        "{e}"
    );
    let e = inv.lookup(&other).await.unwrap_err();
    assert!(e.contains("not a known agent"), "{e}");
    let e = inv.lookup("127.0.0.1:1").await.unwrap_err();
    assert!(e.contains("not a known agent"), "{e}");
}
