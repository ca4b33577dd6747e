//! The real `gpuops` binary in a temp dir: the no-config test alert, every
//! config error at once, `kill -9` losing nothing, secrets never in logs or
//! error messages, `gpuops audit`; a public listener without a webhook
//! token is refused, and no bot command takes a secret on its command line;
//! a scheduled report sends each slot once across a `kill -9`.
#![allow(clippy::disallowed_methods)] // tests spawn the real binary and external tools

use crate::support;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use support::{am_payload, bot_config, free_port, gpuops, wait_http_ok, FakeApi, Scripted};

struct Proc {
    child: Child,
    log: PathBuf,
    base: String,
}

impl Proc {
    fn spawn(dir: &Path, config: Option<&Path>, name: &str) -> Proc {
        let port = free_port();
        let log = dir.join(format!("{name}.log"));
        let mut cmd = Command::new(gpuops());
        cmd.arg("bot")
            .args(["--listen", &format!("127.0.0.1:{port}")]);
        if let Some(c) = config {
            cmd.arg("--config").arg(c);
        }
        let child = cmd
            .current_dir(dir)
            .env_remove("GPUOPS_BOT_CONFIG")
            .env_remove("STATE_DIRECTORY")
            .env_remove("GPUOPS_LOG")
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Proc {
            child,
            log,
            base: format!("http://127.0.0.1:{port}"),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn wait_log(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let l = self.log();
            if l.contains(needle) {
                return l;
            }
            assert!(
                Instant::now() < deadline,
                "{needle:?} not logged within {timeout:?}:\n{l}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn kill9(&mut self) {
        // SIGKILL: no destructor, no flush, no graceful shutdown.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn terminate(&mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill9();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn post(base: &str, token: &str, body: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{base}/alertmanager"))
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_config_a_test_alert_shows_in_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let mut bot = Proc::spawn(dir.path(), None, "bot");
    let log = bot.wait_log("[TEST]", Duration::from_secs(20)).await;
    assert!(log.contains("GpuopsTestAlert"), "{log}");
    assert!(log.contains("no configuration given"), "{log}");
    assert!(dir.path().join("gpuops-bot.db").exists());
    // And a real webhook reaches the console too.
    wait_http_ok(&format!("{}/healthz", bot.base), Duration::from_secs(10)).await;
    let r = post(
        &bot.base,
        "",
        &am_payload("GpuHot", "firing", &[("n7:9949", "warning", "firing")]),
    )
    .await;
    assert_eq!(r.status(), 200);
    bot.wait_log("n7:9949", Duration::from_secs(10)).await;
    bot.terminate();
}

#[test]
fn check_config_reports_every_error_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bot.toml");
    std::fs::write(
        &bad,
        "[server]\nlisten = \"x\"\n[routing]\ndefault_tier = \"P0\"\n[[routing.destinations]]\nslack_channel = \"C1\"\n[agents]\nurl_template = \"http://node\"\n",
    )
    .unwrap();
    let out = Command::new(gpuops())
        .args(["check-config", "--bot"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "server.listen",
        "routing.default_tier",
        "needs a [slack] section",
        "agents.url_template: replaced",
        "gpuops keygen",
        "4 errors",
    ] {
        assert!(err.contains(needle), "{needle:?} missing:\n{err}");
    }
    // The example installed as docs/ops.md says (0600: it holds secrets).
    // Its [runbooks] dir is the installed one: here, the repository's.
    let example = dir.path().join("bot.example.toml");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("config/bot.example.toml")).unwrap();
    std::fs::write(
        &example,
        text.replacen(
            "dir = \"/usr/share/gpuops/runbooks\"",
            &format!("dir = {:?}", root.join("runbooks")),
            1,
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&example, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = Command::new(gpuops())
        .args(["check-config", "--bot"])
        .arg(&example)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let slack = FakeApi::slack().await;
    let discord = FakeApi::discord().await;
    slack.set_down(true);
    discord.set_down(true);
    let cfg = dir.path().join("bot.toml");
    std::fs::write(&cfg, bot_config(dir.path(), &slack, &discord, "")).unwrap();
    std::fs::set_permissions(
        &cfg,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600),
    )
    .unwrap(); // holds inline secrets
    let mut bot = Proc::spawn(dir.path(), Some(&cfg), "first");
    wait_http_ok(&format!("{}/healthz", bot.base), Duration::from_secs(20)).await;
    let r = post(
        &bot.base,
        "hook-token-s3cret",
        &am_payload("GpuXid", "firing", &[("n1", "critical", "firing")]),
    )
    .await;
    assert_eq!(r.status(), 200, "accepted while the chat APIs are down");
    // The bot tried both (and got 503) before it died; waiting for Discord
    // too keeps a loaded machine from killing it between the two attempts.
    slack.wait_for(1, Duration::from_secs(10)).await;
    discord.wait_for(1, Duration::from_secs(10)).await;
    bot.kill9();
    let tried = slack.requests().len();
    slack.set_down(false);
    discord.set_down(false);
    let bot = Proc::spawn(dir.path(), Some(&cfg), "second");
    let deadline = Instant::now() + Duration::from_secs(30);
    while slack.requests().len() <= tried {
        assert!(
            Instant::now() < deadline,
            "not delivered after restart; log:\n{}",
            bot.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let s = slack.requests();
    let delivered = &s[tried];
    assert!(delivered.path.ends_with("chat.postMessage"));
    assert_eq!(delivered.body["channel"], "CP1");
    assert!(delivered.raw.contains("GpuXid"));
    let d = discord.wait_for(2, Duration::from_secs(20)).await;
    assert!(d
        .iter()
        .any(|r| r.path == "/api/v10/channels/1001/messages"));
    bot.wait_log("resuming pending deliveries", Duration::from_secs(5))
        .await;
    // Delivered once: nothing more arrives.
    slack
        .expect_no_more(tried + 1, Duration::from_millis(500))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_logs_or_errors() {
    let dir = tempfile::tempdir().unwrap();
    let slack = FakeApi::slack().await;
    let discord = FakeApi::discord().await;
    let hook = FakeApi::slack().await;
    let hook_url = format!(
        "http://user:pw-s3cret@{}/hook/path-s3cret?token=query-s3cret",
        hook.addr
    );
    let extra =
        format!("[[routing.destinations]]\ntiers = [\"P1\"]\nwebhook_url = \"{hook_url}\"\n");
    let text = bot_config(dir.path(), &slack, &discord, &extra)
        .replace("level = \"info\"", "level = \"debug\"");
    let cfg = dir.path().join("bot.toml");
    std::fs::write(&cfg, text).unwrap();
    std::fs::set_permissions(
        &cfg,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600),
    )
    .unwrap(); // holds inline secrets
               // The platforms answer with errors, some echoing the credentials back.
    slack.script([
        Scripted::new(
            500,
            json!({"ok": false, "error": "boom xoxb-test-token-s3cret"}),
        ),
        Scripted::new(
            200,
            json!({"ok": false, "error": "invalid_auth", "detail": "token xoxb-test-token-s3cret"}),
        ),
    ]);
    discord.script([
        Scripted::new(
            500,
            json!({"message": "Bot discord-token-s3cret is bad", "code": 0}),
        ),
        Scripted::new(
            401,
            json!({"message": "401: Unauthorized discord-token-s3cret", "code": 0}),
        ),
    ]);
    hook.script([
        Scripted::new(500, json!({"echo": "pw-s3cret query-s3cret path-s3cret"})),
        Scripted::new(400, json!({"echo": "pw-s3cret query-s3cret path-s3cret"})),
    ]);
    let mut bot = Proc::spawn(dir.path(), Some(&cfg), "bot");
    wait_http_ok(&format!("{}/healthz", bot.base), Duration::from_secs(20)).await;
    let wrong = post(
        &bot.base,
        "wrong",
        &am_payload("A", "firing", &[("n", "critical", "firing")]),
    )
    .await;
    assert_eq!(wrong.status(), 401);
    let wrong_body = wrong.text().await.unwrap();
    let r = post(
        &bot.base,
        "hook-token-s3cret",
        &am_payload("GpuXid", "firing", &[("n1", "critical", "firing")]),
    )
    .await;
    assert_eq!(r.status(), 200);
    bot.wait_log("moved to dead letters", Duration::from_secs(20))
        .await;
    slack.wait_for(2, Duration::from_secs(10)).await;
    discord.wait_for(2, Duration::from_secs(10)).await;
    hook.wait_for(2, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let metrics = reqwest::get(format!("{}/metrics", bot.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    bot.terminate();
    let log = bot.log();
    let db_dead: String = {
        let store = gpuops::store::Store::open(&dir.path().join("bot.db")).unwrap();
        let rt_dead = store.dead_letters().await.unwrap();
        assert_eq!(rt_dead.len(), 3, "{rt_dead:?}");
        format!("{rt_dead:?}")
    };
    for secret in [
        "xoxb-test-token-s3cret",
        "slack-signing-s3cret",
        "discord-token-s3cret",
        "hook-token-s3cret",
        "pw-s3cret",
        "query-s3cret",
        "path-s3cret",
    ] {
        assert!(!log.contains(secret), "{secret} in the log:\n{log}");
        assert!(!metrics.contains(secret), "{secret} in /metrics");
        assert!(!wrong_body.contains(secret), "{secret} in a 401 body");
        assert!(
            !db_dead.contains(secret),
            "{secret} in a dead letter: {db_dead}"
        );
    }
    assert!(
        log.contains("invalid_auth"),
        "the platform's error is logged:\n{log}"
    );
    // Every line is JSON with the documented fields.
    for line in log.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert_eq!(v["service"], "gpuops-bot");
        assert!(v.get("trace_id").is_some() && v.get("instance_id").is_some());
    }
}

#[test]
fn audit_prints_records_since() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bot.db");
    let cfg = dir.path().join("bot.toml");
    std::fs::write(&cfg, format!("[store]\npath = \"{}\"\n", db.display())).unwrap();
    let store = gpuops::store::Store::open(&db).unwrap();
    store
        .audit_blocking(
            "slack:U0OPER",
            "silence",
            &json!({"matchers": "alertname=GpuXid", "duration": "1h"}),
            Some("GpuXid"),
            "ok",
        )
        .unwrap();
    drop(store);
    let out = Command::new(gpuops())
        .args(["audit", "--config"])
        .arg(&cfg)
        .args(["--since", "1h"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("slack:U0OPER") && text.contains("silence") && text.contains("GpuXid"),
        "{text}"
    );
    assert!(text.contains("\"duration\":\"1h\""), "{text}");
}

#[test]
fn bot_refuses_public_listener_without_webhook_token() {
    let dir = tempfile::tempdir().unwrap();
    let open = dir.path().join("open.toml");
    let db = dir.path().join("bot.db");
    let port = free_port();
    std::fs::write(
        &open,
        format!(
            "[store]\npath = \"{}\"\n[server]\nlisten = \"0.0.0.0:{port}\"\n",
            db.display()
        ),
    )
    .unwrap();
    let run = |args: &[&str], config: &Path| {
        let out = Command::new(gpuops())
            .args(args)
            .arg(config)
            .current_dir(dir.path())
            .env_remove("GPUOPS_BOT_CONFIG")
            .env_remove("STATE_DIRECTORY")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let named = format!("{}:4: server.listen: 0.0.0.0:{port} is not a loopback address and server.webhook_token is not set", open.display());
    let (ok, err) = run(&["check-config", "--bot"], &open);
    assert!(!ok && err.contains(&named), "{err}");
    assert!(
        err.contains("allow_unauthenticated_webhooks = true"),
        "{err}"
    );
    // The bot itself refuses to start, with the same words, and serves nothing.
    let (ok, err) = run(&["bot", "--config"], &open);
    assert!(!ok && err.contains(&named), "{err}");
    assert!(!db.exists(), "nothing was opened");
    // A safe file made public with --listen is refused too.
    let local = dir.path().join("local.toml");
    std::fs::write(&local, format!("[store]\npath = \"{}\"\n", db.display())).unwrap();
    let public = format!("0.0.0.0:{port}");
    let (ok, err) = run(&["bot", "--listen", &public, "--config"], &local);
    assert!(!ok, "{err}");
    assert!(
        err.contains("--listen")
            && err.contains(&local.display().to_string())
            && err.contains("server.webhook_token"),
        "{err}"
    );
    assert!(!db.exists(), "nothing was opened");
    // Saying so explicitly is allowed.
    let allowed = dir.path().join("allowed.toml");
    std::fs::write(
        &allowed,
        format!(
            "[store]\npath = \"{}\"\n[server]\nlisten = \"0.0.0.0:{port}\"\nallow_unauthenticated_webhooks = true\n",
            db.display()
        ),
    )
    .unwrap();
    let (ok, err) = run(&["check-config", "--bot"], &allowed);
    assert!(ok, "{err}");
}

#[test]
fn bot_commands_take_no_secret_on_the_command_line() {
    use clap::CommandFactory as _;
    let cli = gpuops::cli::Cli::command();
    let mut seen = Vec::new();
    // The agent's flags are reviewed with the agent (exec signing).
    for sub in cli.get_subcommands().filter(|s| s.get_name() != "agent") {
        let mut stack = vec![sub];
        while let Some(cmd) = stack.pop() {
            stack.extend(cmd.get_subcommands());
            for arg in cmd.get_arguments() {
                let name = arg.get_id().as_str().to_ascii_lowercase();
                seen.push(format!("{} {name}", cmd.get_name()));
                let takes_value = arg.get_action().takes_values();
                let secretish = ["secret", "token", "password", "key"]
                    .iter()
                    .any(|w| name.contains(w));
                assert!(
                    !(takes_value && secretish && !name.ends_with("_file")),
                    "`gpuops {} --{name}` would put a secret on the command line (use a config *_file key)",
                    cmd.get_name()
                );
            }
        }
    }
    assert!(seen.iter().any(|s| s == "bot config"), "{seen:?}");
}

/// The health-report posts the fake Slack received in `channel`.
fn report_posts(slack: &FakeApi, channel: &str) -> usize {
    slack
        .calls("chat.postMessage")
        .iter()
        .filter(|r| r.body["channel"] == channel)
        .count()
}

async fn wait_report_posts(slack: &FakeApi, channel: &str, n: usize, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while report_posts(slack, channel) < n {
        assert!(
            Instant::now() < deadline,
            "{n} report posts not seen within {timeout:?} (got {})",
            report_posts(slack, channel)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_slots_fire_once_each_across_kill_9() {
    let slack = FakeApi::slack().await;
    let discord = FakeApi::discord().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bot.toml");
    // A report every 3 s; Prometheus unreachable (the report still goes
    // out, naming what it could not compute).
    let extra = format!(
        "[prometheus]\nurl = \"http://127.0.0.1:{}\"\n\n[[reports]]\nname = \"tick\"\nschedule = \"*/3 * * * * *\"\nperiod = \"1h\"\nslack_channel = \"CREP\"\n",
        free_port()
    );
    std::fs::write(&cfg, bot_config(dir.path(), &slack, &discord, &extra)).unwrap();
    std::fs::set_permissions(
        &cfg,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600),
    )
    .unwrap(); // holds inline secrets

    let mut first = Proc::spawn(dir.path(), Some(&cfg), "first");
    wait_http_ok(&format!("{}/healthz", first.base), Duration::from_secs(20)).await;
    wait_report_posts(&slack, "CREP", 2, Duration::from_secs(30)).await;
    first.kill9();
    let at_kill = report_posts(&slack, "CREP");
    // Down for longer than a slot: at least one slot is missed.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let second = Proc::spawn(dir.path(), Some(&cfg), "second");
    wait_http_ok(&format!("{}/healthz", second.base), Duration::from_secs(20)).await;
    // Three posts: one of them may be the post in flight at the kill, sent
    // again (the outbox's at-least-once window), so two are new slots.
    wait_report_posts(&slack, "CREP", at_kill + 3, Duration::from_secs(30)).await;
    drop(second);
    let posts = report_posts(&slack, "CREP");

    let store = gpuops::store::Store::open(&dir.path().join("bot.db")).unwrap();
    let slots = store.report_slots("tick".into()).await.unwrap();
    let late: Vec<_> = slots.iter().filter(|s| s.1).collect();
    assert_eq!(
        late.len(),
        1,
        "the missed slots are sent once, as one late report: {slots:?}"
    );
    let sent = slots.iter().filter(|s| s.2 != "empty").count();
    // Rows claimed just before the second process stopped are still in
    // its outbox, not lost.
    let pending = store.pending().await.unwrap() as usize;
    eprintln!(
        "report slots: {} claimed ({} late), {posts} posts ({at_kill} before the kill), {pending} pending",
        slots.len(),
        late.len()
    );
    // Every claimed slot is posted once; only a post in flight at the
    // `kill -9` may be sent again by the second process (the outbox's
    // at-least-once window), never more than that one.
    assert!(
        posts + pending == sent || posts + pending == sent + 1,
        "{posts} posts + {pending} pending for {sent} claimed slots: {slots:?}"
    );
    assert!(sent >= 4, "two slots before the kill, two after: {slots:?}");
}
