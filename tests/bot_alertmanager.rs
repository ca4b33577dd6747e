//! End to end with a real AlertManager: `amtool alert add` fires an alert,
//! AlertManager posts its webhook (with the bearer token) to the real bot
//! binary, which posts to the fake Slack; resolving edits the message.
#![allow(clippy::disallowed_methods)] // tests spawn the real binary and external tools

mod support;

use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{bot_config, free_port, gpuops, wait_http_ok, FakeApi};

const ALERTMANAGER: &str = "/usr/bin/prometheus-alertmanager";
const AMTOOL: &str = "/usr/bin/amtool";

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn amtool(am: &str, args: &[&str]) {
    let out = Command::new(AMTOOL)
        .args(args)
        .arg(format!("--alertmanager.url={am}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "amtool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool, log: &Path) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "{what} within {timeout:?}; bot log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs alertmanager; run by .ci/run"]
async fn a_real_alertmanager_alert_reaches_slack_and_its_resolve_edits_it() {
    let dir = tempfile::tempdir().unwrap();
    let slack = FakeApi::slack().await;
    let discord = FakeApi::discord().await;
    let bot_port = free_port();
    let cfg = dir.path().join("bot.toml");
    std::fs::write(&cfg, bot_config(dir.path(), &slack, &discord, "")).unwrap();
    std::fs::set_permissions(
        &cfg,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600),
    )
    .unwrap(); // holds inline secrets
    let bot_log = dir.path().join("bot.log");
    let _bot = Killed(
        Command::new(gpuops())
            .args(["bot", "--config"])
            .arg(&cfg)
            .args(["--listen", &format!("127.0.0.1:{bot_port}")])
            .stderr(File::create(&bot_log).unwrap())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_http_ok(
        &format!("http://127.0.0.1:{bot_port}/healthz"),
        Duration::from_secs(20),
    )
    .await;

    let am_port = free_port();
    let am_yml = dir.path().join("alertmanager.yml");
    std::fs::write(
        &am_yml,
        format!(
            r#"route:
  receiver: gpuops
  group_by: ['alertname']
  group_wait: 1s
  group_interval: 2s
  repeat_interval: 1h
receivers:
  - name: gpuops
    webhook_configs:
      - url: http://127.0.0.1:{bot_port}/alertmanager
        send_resolved: true
        http_config:
          authorization:
            credentials: hook-token-s3cret
"#
        ),
    )
    .unwrap();
    let am_log = dir.path().join("am.log");
    let _am = Killed(
        Command::new(ALERTMANAGER)
            .arg(format!("--config.file={}", am_yml.display()))
            .arg(format!(
                "--storage.path={}",
                dir.path().join("am-data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{am_port}"))
            .arg("--cluster.listen-address=")
            .stderr(File::create(&am_log).unwrap())
            .spawn()
            .unwrap(),
    );
    let am = format!("http://127.0.0.1:{am_port}");
    wait_http_ok(&format!("{am}/-/ready"), Duration::from_secs(20)).await;

    amtool(
        &am,
        &[
            "alert",
            "add",
            "alertname=GpuFellOffBus",
            "severity=critical",
            "instance=gpu-node-7:9949",
            "gpu=3",
            "--annotation=summary=GPU 3 has fallen off the bus (XID 79)",
        ],
    );
    wait_until(
        "the alert was not posted to Slack's P1 channel",
        Duration::from_secs(30),
        || {
            slack
                .requests()
                .iter()
                .any(|r| r.path.ends_with("chat.postMessage") && r.body["channel"] == "CP1")
        },
        &bot_log,
    )
    .await;
    let post = slack
        .requests()
        .into_iter()
        .find(|r| r.path.ends_with("chat.postMessage"))
        .unwrap();
    assert!(
        post.raw.contains("GpuFellOffBus") && post.raw.contains("gpu-node-7:9949"),
        "{}",
        post.raw
    );
    assert!(post.raw.contains("gpuops_ack"));

    // Resolve it: AlertManager sends "resolved", the bot edits the message.
    let ended = (chrono::Utc::now() - chrono::Duration::seconds(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    amtool(
        &am,
        &[
            "alert",
            "add",
            "alertname=GpuFellOffBus",
            "severity=critical",
            "instance=gpu-node-7:9949",
            "gpu=3",
            "--annotation=summary=GPU 3 has fallen off the bus (XID 79)",
            &format!("--end={ended}"),
        ],
    );
    wait_until(
        "the resolve did not edit the message",
        Duration::from_secs(30),
        || {
            slack
                .requests()
                .iter()
                .any(|r| r.path.ends_with("chat.update") && r.raw.contains("RESOLVED"))
        },
        &bot_log,
    )
    .await;
    let posts = slack
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("chat.postMessage") && r.body["thread_ts"].is_null())
        .count();
    assert_eq!(posts, 1, "a resolve must not post a new top-level message");
}
