//! The real `gpuops` binary on PostgreSQL: `gpuops store copy` moving a
//! SQLite install over (an open group, a pending delivery and dead letters
//! survive, and the bot on PostgreSQL delivers the pending row); three
//! replicas on one database with AlertManager-HA-style double posting, a
//! `kill -9` and a graceful stop (each alert posted once per destination,
//! in order); PostgreSQL stopped for 10 s under load (nothing acknowledged
//! is lost, the replicas recover by themselves). All ignored in plain
//! `cargo test`: `.ci/run` starts a throwaway server and includes them.
#![allow(clippy::disallowed_methods)] // tests spawn the real binary and pg_ctl

use crate::support;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::Request;
use support::{am_payload, bot_config, free_port, gpuops, wait_http_ok, FakeApi, Recorded};
use tower::ServiceExt as _;

const TOKEN: &str = "hook-token-s3cret";

/// The tests here share one server and one stops it: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Proc {
    child: Child,
    log: PathBuf,
    base: String,
}

impl Proc {
    fn spawn(dir: &Path, config: &Path, name: &str) -> Proc {
        let port = free_port();
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(gpuops())
            .arg("bot")
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--config")
            .arg(config)
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

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn terminate(&mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
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

/// The bot configuration of `support::bot_config` on PostgreSQL at `url`.
fn pg_config(dir: &Path, slack: &FakeApi, discord: &FakeApi, url: &str, extra: &str) -> PathBuf {
    let text = bot_config(dir, slack, discord, extra);
    let sqlite = format!("path = \"{}\"", dir.join("bot.db").display());
    assert!(text.contains(&sqlite));
    let text = text.replace(&sqlite, &format!("url = \"{url}\""));
    let path = dir.join("bot.toml");
    std::fs::write(&path, text).unwrap();
    private(&path);
    path
}

/// Mode 0600: the file holds secrets (gpuops refuses them in a file others can read).
fn private(path: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

async fn post(client: &reqwest::Client, base: &str, body: &str) -> Option<serde_json::Value> {
    let r = client
        .post(format!("{base}/alertmanager"))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body(body.to_string())
        .timeout(Duration::from_secs(40))
        .send()
        .await
        .ok()?;
    if r.status() != 200 {
        return None;
    }
    r.json().await.ok()
}

/// The PostgreSQL test URL with a password added (trust authentication on
/// the test server ignores it): it must never show up anywhere.
fn with_password(url: &str) -> String {
    url.replacen("postgres@", "postgres:pw-hunter2-s3cret@", 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL: run by .ci/run"]
async fn store_copy_moves_a_sqlite_install_and_the_bot_delivers_its_pending_rows() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let slack = FakeApi::slack().await;
    let discord = FakeApi::discord().await;
    let db = dir.path().join("bot.db");
    // A single-node install: one group whose deliveries became dead
    // letters, one open group with both deliveries pending, an audit
    // record and a replay key.
    let (open_group, dead_group) = {
        let text = bot_config(dir.path(), &slack, &discord, "");
        let cfg = gpuops::config::BotConfig::from_str(Path::new("t.toml"), &text).unwrap();
        let store = gpuops::store::Store::open(&db).unwrap();
        let (state, _worker) = gpuops::bot::BotState::new(Arc::new(cfg), store.clone()).unwrap();
        let send = |body: String| {
            let app = gpuops::bot_role::router(state.clone());
            async move {
                let resp = app
                    .oneshot(
                        Request::post("/alertmanager")
                            .header("content-type", "application/json")
                            .header("authorization", format!("Bearer {TOKEN}"))
                            .body(Body::from(body))
                            .unwrap(),
                    )
                    .await
                    .unwrap();
                assert_eq!(resp.status(), 200);
                let bytes = http_body_util::BodyExt::collect(resp.into_body())
                    .await
                    .unwrap()
                    .to_bytes();
                serde_json::from_slice::<serde_json::Value>(&bytes).unwrap()["group_id"]
                    .as_i64()
                    .unwrap()
            }
        };
        let dead = send(am_payload(
            "GpuDead",
            "firing",
            &[("n1", "critical", "firing")],
        ))
        .await;
        for row in store.due(gpuops::store::now() + 1.0, 10).await.unwrap() {
            store
                .dead_letter(row, "channel_not_found".into())
                .await
                .unwrap();
        }
        let open = send(am_payload(
            "GpuXidOpen",
            "firing",
            &[("n2", "critical", "firing")],
        ))
        .await;
        store
            .audit(
                "cli:test".into(),
                "note".into(),
                serde_json::json!({}),
                None,
                "ok".into(),
            )
            .await
            .unwrap();
        assert!(store.first_use([3; 32], 100, 1_000_000_000).await.unwrap());
        assert_eq!(store.pending().await.unwrap(), 2);
        (open, dead)
    };
    let url = gpuops::store::pg::test_url().await.unwrap();
    let secret_url = with_password(&url);
    // The password from a file: one in --to would show in `ps` (refused).
    let password_file = dir.path().join("pg.password");
    std::fs::write(&password_file, "pw-hunter2-s3cret\n").unwrap();
    private(&password_file);
    let out = Command::new(gpuops())
        .args(["store", "copy", "--from"])
        .arg(format!("sqlite:{}", db.display()))
        .args(["--to", &url])
        .arg("--password-file")
        .arg(&password_file)
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("outbox: 2 row(s)"), "{stdout}");
    assert!(stdout.contains("dead_letters: 2 row(s)"), "{stdout}");
    assert!(
        !stdout.contains("hunter2") && !stderr.contains("hunter2"),
        "{stdout}{stderr}"
    );
    // Copying again into the now non-empty database is refused, clearly.
    let again = Command::new(gpuops())
        .args(["store", "copy", "--from"])
        .arg(format!("sqlite:{}", db.display()))
        .args(["--to", &url])
        .arg("--password-file")
        .arg(&password_file)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(!again.status.success());
    assert!(err.contains("empty database"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");

    let pg = gpuops::store::pg::open_url(&url).await.unwrap();
    assert_eq!(pg.pending().await.unwrap(), 2);
    assert_eq!(pg.dead_letters().await.unwrap().len(), 2);
    assert_eq!(
        pg.group(open_group).await.unwrap().unwrap().status,
        "firing"
    );
    assert!(pg.group(dead_group).await.unwrap().is_some());
    assert!(
        !pg.first_use([3; 32], 200, 1_000_000_000).await.unwrap(),
        "replay keys kept"
    );
    assert_eq!(pg.count_rows("audit").await.unwrap(), 1);

    // The bot on PostgreSQL delivers the pending rows, once.
    let cfg = pg_config(dir.path(), &slack, &discord, &secret_url, "");
    let bot = Proc::spawn(dir.path(), &cfg, "pg");
    wait_http_ok(&format!("{}/readyz", bot.base), Duration::from_secs(30)).await;
    let s = slack.wait_for(1, Duration::from_secs(20)).await;
    let d = discord.wait_for(1, Duration::from_secs(20)).await;
    assert!(s[0].path.ends_with("chat.postMessage") && s[0].raw.contains("GpuXidOpen"));
    assert!(d[0].raw.contains("GpuXidOpen"));
    slack.expect_no_more(1, Duration::from_millis(800)).await;
    // New rows get ids after the copied ones (sequences were reset).
    let client = reqwest::Client::new();
    let v = post(
        &client,
        &bot.base,
        &am_payload("GpuNew", "firing", &[("n3", "critical", "firing")]),
    )
    .await
    .expect("webhook accepted");
    assert!(
        v["group_id"].as_i64().unwrap() > open_group.max(dead_group),
        "{v}"
    );
    let log = bot.log();
    assert!(!log.contains("hunter2"), "{log}");
    assert!(log.contains("postgres://postgres:***@"), "{log}");
}

/// Top-level posts per (alertname, destination: `slack:CHANNEL` or
/// `discord`), and order violations (an edit of a group recorded before its
/// first post there).
type Posts = BTreeMap<(String, String), usize>;

fn tally(slack: &[Recorded], discord: &[Recorded]) -> (Posts, usize) {
    let mut posts = BTreeMap::new();
    let mut disorder = 0;
    let name = |r: &Recorded| {
        let raw = &r.raw;
        raw.find("HaG").map(|i| raw[i..i + 8].to_string())
    };
    let mut first_post: HashMap<(String, String), usize> = HashMap::new();
    for (i, r) in slack.iter().enumerate() {
        let Some(g) = name(r) else { continue };
        let dest = format!("slack:{}", r.body["channel"].as_str().unwrap_or(""));
        let top = r.path.ends_with("chat.postMessage") && r.body.get("thread_ts").is_none();
        if top {
            *posts.entry((g.clone(), dest.clone())).or_insert(0) += 1;
            first_post.entry((g, dest)).or_insert(i);
        } else if r.path.ends_with("chat.update") && !first_post.contains_key(&(g, dest)) {
            disorder += 1;
        }
    }
    for (i, r) in discord.iter().enumerate() {
        let Some(g) = name(r) else { continue };
        let dest = "discord".to_string();
        if r.method == "POST" && r.body.get("message_reference").is_none() {
            *posts.entry((g.clone(), dest.clone())).or_insert(0) += 1;
            first_post.entry((g, dest)).or_insert(i);
        } else if r.method == "PATCH" && !first_post.contains_key(&(g, dest)) {
            disorder += 1;
        }
    }
    (posts, disorder)
}

/// Second and later top-level posts of a (group, destination) whose first
/// post was sent before `kill` and the next after it: the posts a killed
/// replica had made but not recorded. Returns (those, any others).
fn duplicates_around(
    slack: &[Recorded],
    discord: &[Recorded],
    kill: Instant,
) -> (usize, Vec<String>) {
    let mut times: BTreeMap<(String, String), Vec<Instant>> = BTreeMap::new();
    let name = |r: &Recorded| r.raw.find("HaG").map(|i| r.raw[i..i + 8].to_string());
    for r in slack {
        if r.path.ends_with("chat.postMessage") && r.body.get("thread_ts").is_none() {
            if let Some(g) = name(r) {
                let dest = format!("slack:{}", r.body["channel"].as_str().unwrap_or(""));
                times.entry((g, dest)).or_default().push(r.at);
            }
        }
    }
    for r in discord {
        if r.method == "POST" && r.body.get("message_reference").is_none() {
            if let Some(g) = name(r) {
                times.entry((g, "discord".into())).or_default().push(r.at);
            }
        }
    }
    let (mut at_kill, mut other) = (0, Vec::new());
    for ((group, dest), t) in times.iter().filter(|(_, t)| t.len() > 1) {
        if t[0] < kill && t[1..].iter().all(|x| *x > kill) {
            at_kill += t.len() - 1;
        } else {
            // Each post's time from the kill, for the failure message.
            let from_kill: Vec<String> = t
                .iter()
                .map(|x| {
                    let ms = |d: Duration| d.as_millis();
                    match x.checked_duration_since(kill) {
                        Some(d) => format!("kill+{}ms", ms(d)),
                        None => format!("kill-{}ms", ms(kill - *x)),
                    }
                })
                .collect();
            other.push(format!("{group} to {dest}: {from_kill:?}"));
        }
    }
    (at_kill, other)
}

/// Escalation step replies per alert group id (in `#CLEADS`).
fn escalation_steps(slack: &[Recorded]) -> BTreeMap<String, usize> {
    let mut steps = BTreeMap::new();
    for r in slack {
        if r.body["channel"] != "CLEADS" || r.body.get("thread_ts").is_none() {
            continue;
        }
        let text = r.body["text"].as_str().unwrap_or("");
        if let Some(i) = text.find("alert group #") {
            let id: String = text[i + 13..]
                .chars()
                .take_while(|c| c.is_ascii_digit())
                .collect();
            *steps.entry(id).or_insert(0) += 1;
        }
    }
    steps
}

fn replica_config(dir: &Path, slack: &FakeApi, discord: &FakeApi, url: &str) -> PathBuf {
    pg_config(dir, slack, discord, url, "")
}

/// [`replica_config`] where P1 groups not acknowledged within 2 s escalate
/// once to `#CLEADS` (a post there and a thread reply).
fn escalating_config(dir: &Path, slack: &FakeApi, discord: &FakeApi, url: &str) -> PathBuf {
    let path = replica_config(dir, slack, discord, url);
    let text = std::fs::read_to_string(&path).unwrap().replacen(
        "discord_channel = \"1001\"\n",
        "discord_channel = \"1001\"\n[routing.destinations.escalation]\nafter = \"2s\"\nnotify = [\"slack:CLEADS\"]\n",
        1,
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// Sends `groups` firing webhooks, each to two replicas (as an AlertManager
/// HA pair does); returns the groups at least one replica acknowledged.
async fn send_all(
    client: &reqwest::Client,
    bases: &[String],
    groups: std::ops::Range<usize>,
) -> Vec<usize> {
    let mut acked = Vec::new();
    let mut tasks = tokio::task::JoinSet::new();
    for g in groups {
        let body = am_payload(
            &format!("HaG{g:05}"),
            "firing",
            &[("n1", "critical", "firing")],
        );
        let (a, b) = (bases[g % 3].clone(), bases[(g + 1) % 3].clone());
        let client = client.clone();
        tasks.spawn(async move {
            let (x, y) = tokio::join!(post(&client, &a, &body), post(&client, &b, &body));
            (g, x.is_some() || y.is_some())
        });
        while tasks.len() >= 24 {
            if let Some(Ok((g, ok))) = tasks.join_next().await {
                if ok {
                    acked.push(g);
                }
            }
        }
    }
    while let Some(Ok((g, ok))) = tasks.join_next().await {
        if ok {
            acked.push(g);
        }
    }
    acked
}

/// Waits until every acknowledged group has a post at each of `dests`.
async fn wait_delivered(
    slack: &FakeApi,
    discord: &FakeApi,
    acked: &[usize],
    dests: &[&str],
    timeout: Duration,
) {
    let deadline = Instant::now() + timeout;
    loop {
        let (posts, _) = tally(&slack.requests(), &discord.requests());
        let missing: Vec<usize> = acked
            .iter()
            .copied()
            .filter(|g| {
                let n = format!("HaG{g:05}");
                dests
                    .iter()
                    .any(|d| !posts.contains_key(&(n.clone(), d.to_string())))
            })
            .collect();
        if missing.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} acknowledged groups not delivered within {timeout:?}, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(5)]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// How many groups the HA test sends (`GPUOPS_HA_GROUPS`, default 600:
/// 1,200 webhooks, about a minute on a 2-core machine).
fn ha_groups() -> usize {
    std::env::var("GPUOPS_HA_GROUPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL: run by .ci/run"]
async fn three_replicas_deliver_each_alert_once_through_kill_9_and_a_graceful_stop() {
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let slack = FakeApi::slack().await;
    let discord = FakeApi::discord().await;
    let url = gpuops::store::pg::test_url().await.unwrap();
    gpuops::store::pg::open_url(&url).await.unwrap(); // migrated once
    let cfg = escalating_config(dir.path(), &slack, &discord, &url);
    let mut procs: Vec<Proc> = (0..3)
        .map(|i| Proc::spawn(dir.path(), &cfg, &format!("replica{i}")))
        .collect();
    for p in &procs {
        wait_http_ok(&format!("{}/readyz", p.base), Duration::from_secs(30)).await;
    }
    let client = reqwest::Client::new();
    let n = ha_groups();
    let third = n / 3;
    let bases: Vec<String> = procs.iter().map(|p| p.base.clone()).collect();
    let mut acked = send_all(&client, &bases, 0..third).await;
    // kill -9 replica 0 while it delivers. A duplicate can only be a post
    // it had sent but not yet recorded when it died (in flight: at most its
    // delivery concurrency, 8, per destination).
    let kill_at = Instant::now();
    procs[0].kill9();
    let at_kill = (slack.requests().len(), discord.requests().len());
    acked.extend(send_all(&client, &bases, third..2 * third).await);
    procs[0] = Proc::spawn(dir.path(), &cfg, "replica0-again");
    wait_http_ok(
        &format!("{}/readyz", procs[0].base),
        Duration::from_secs(30),
    )
    .await;
    let bases: Vec<String> = procs.iter().map(|p| p.base.clone()).collect();
    // Replica 1 stops gracefully; webhooks sent to it are refused (the other
    // replica of each pair acknowledges them).
    let stop_began = Instant::now();
    // The wait for its exit must not take a worker from the fake APIs
    // that answer its last deliveries.
    tokio::task::block_in_place(|| procs[1].terminate());
    let stop_ended = Instant::now();
    acked.extend(send_all(&client, &bases, 2 * third..n).await);
    let dests = ["slack:CP1", "discord", "slack:CLEADS"];
    // Delivery runs at some tens of posts per second per replica here.
    let patience = Duration::from_secs((n as u64 / 8).max(150));
    wait_delivered(&slack, &discord, &acked, &dests, patience).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while escalation_steps(&slack.requests()).len() < acked.len() {
        assert!(Instant::now() < deadline, "escalation steps missing");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    slack
        .expect_no_more(slack.requests().len(), Duration::from_secs(3))
        .await;
    let (slack_r, discord_r) = (slack.requests(), discord.requests());
    let (posts, disorder) = tally(&slack_r, &discord_r);
    let (dupes_total, dupes_other) = duplicates_around(&slack_r, &discord_r, kill_at);
    let steps = escalation_steps(&slack_r);
    let step_dupes: usize = steps.values().map(|n| n - 1).sum();
    println!(
        "HA: {n} groups, {} webhooks, {} acknowledged groups, {} top-level posts, {dupes_total} in-flight duplicates at the kill -9 (requests then: slack {}, discord {}), {disorder} out of order, {} escalation steps ({step_dupes} twice), {:.1}s",
        n * 2,
        acked.len(),
        posts.values().sum::<usize>(),
        at_kill.0,
        at_kill.1,
        steps.len(),
        started.elapsed().as_secs_f64()
    );
    assert_eq!(steps.len(), n, "every group escalated");
    assert!(
        step_dupes <= 8,
        "escalation steps fired twice ({step_dupes}) beyond the deliveries in flight at the kill"
    );
    assert_eq!(disorder, 0, "edits before posts");
    assert!(
        dupes_other.is_empty(),
        "posted twice outside the kill -9 window (graceful stop of replica 1 from kill+{}ms to kill+{}ms): {dupes_other:#?}",
        stop_began.duration_since(kill_at).as_millis(),
        stop_ended.duration_since(kill_at).as_millis(),
    );
    assert!(
        dupes_total <= 3 * 8,
        "more duplicates ({dupes_total}) than the killed replica had deliveries in flight"
    );
    assert_eq!(
        acked.len(),
        n,
        "a group both replicas refused: {}",
        procs[2].log()
    );
    for p in &procs {
        assert!(!p.log().contains("panicked"), "{}", p.log());
    }
}

/// `pg_ctl` as the user that owns the test server's data directory.
fn pg_ctl(action: &str) {
    let ctl =
        std::env::var("GPUOPS_TEST_PG_CTL").expect("GPUOPS_TEST_PG_CTL (set by .ci/postgres)");
    let data =
        std::env::var("GPUOPS_TEST_PG_DATA").expect("GPUOPS_TEST_PG_DATA (set by .ci/postgres)");
    let log =
        std::env::var("GPUOPS_TEST_PG_LOG").expect("GPUOPS_TEST_PG_LOG (set by .ci/postgres)");
    let mut args = vec![
        ctl,
        "-D".into(),
        data,
        "-l".into(),
        log,
        "-w".into(),
        "-t".into(),
        "60".into(),
    ];
    if action == "stop" {
        args.extend(["-m".into(), "fast".into()]);
    }
    args.push(action.into());
    let root = rustix::process::getuid().is_root();
    let mut cmd = if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "nobody", "--"]).args(&args);
        c
    } else {
        let mut c = Command::new(&args[0]);
        c.args(&args[1..]);
        c
    };
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "pg_ctl {action}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL: run by .ci/run"]
async fn postgres_down_for_10s_loses_nothing_acknowledged_and_replicas_recover() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let slack = FakeApi::slack().await;
    let discord = FakeApi::discord().await;
    let url = gpuops::store::pg::test_url().await.unwrap();
    gpuops::store::pg::open_url(&url).await.unwrap();
    let cfg = replica_config(dir.path(), &slack, &discord, &url);
    let procs: Vec<Proc> = (0..2)
        .map(|i| Proc::spawn(dir.path(), &cfg, &format!("replica{i}")))
        .collect();
    for p in &procs {
        wait_http_ok(&format!("{}/readyz", p.base), Duration::from_secs(30)).await;
    }
    let bases: Vec<String> = procs.iter().map(|p| p.base.clone()).collect();
    let client = reqwest::Client::new();
    // Load: one webhook every 20 ms to alternating replicas, throughout.
    let sender = {
        let (client, bases) = (client.clone(), bases.clone());
        tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut refused = 0;
            for g in 0..900usize {
                let body = am_payload(
                    &format!("HaG{g:05}"),
                    "firing",
                    &[("n1", "critical", "firing")],
                );
                match post(&client, &bases[g % 2], &body).await {
                    Some(_) => acked.push(g),
                    None => refused += 1,
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (acked, refused)
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    pg_ctl("stop");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let r = client
        .get(format!("{}/readyz", bases[0]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503, "not ready without its database");
    // A signed chat command gets a clear answer, not a signature error.
    let ts = gpuops::store::now() as i64;
    let body = "command=%2Fgpuops&text=alerts&user_id=U1&user_name=u&channel_id=C1&team_id=T1";
    let r = client
        .post(format!("{}/slack/commands", bases[1]))
        .header("content-type", "application/x-www-form-urlencoded")
        .header(gpuops::signing::SLACK_TIMESTAMP, ts.to_string())
        .header(
            gpuops::signing::SLACK_SIGNATURE,
            gpuops::signing::sign_slack(b"slack-signing-s3cret", ts, body.as_bytes()),
        )
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(text.contains("storage unavailable"), "{text}");
    tokio::time::sleep(Duration::from_secs(8)).await;
    pg_ctl("start");
    let (acked, refused) = sender.await.unwrap();
    for p in &procs {
        wait_http_ok(&format!("{}/readyz", p.base), Duration::from_secs(30)).await;
    }
    wait_delivered(
        &slack,
        &discord,
        &acked,
        &["slack:CP1", "discord"],
        Duration::from_secs(90),
    )
    .await;
    let (posts, disorder) = tally(&slack.requests(), &discord.requests());
    let dupes: usize = posts.values().map(|n| n - 1).sum();
    println!(
        "outage: {} webhooks acknowledged, {refused} refused with 503 while PostgreSQL was down, {dupes} duplicates",
        acked.len()
    );
    assert!(refused > 0, "the outage was not noticed");
    assert_eq!(disorder, 0);
    assert_eq!(dupes, 0, "no replica died: nothing may be posted twice");
}

fn store_migrate(config: &Path) -> (bool, String) {
    let out = Command::new(gpuops())
        .args(["store", "migrate", "--config"])
        .arg(config)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn store_migrate_applies_the_sqlite_schema_once_and_migrate_on_start_false_refuses_an_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bot.db");
    let cfg = dir.path().join("bot.toml");
    std::fs::write(
        &cfg,
        format!(
            "[store]\npath = \"{}\"\nmigrate_on_start = false\n",
            db.display()
        ),
    )
    .unwrap();
    // A bot told not to migrate refuses a store without the schema.
    let out = Command::new(gpuops())
        .args([
            "bot",
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--config",
        ])
        .arg(&cfg)
        .current_dir(dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("gpuops store migrate"), "{err}");
    let (ok, text) = store_migrate(&cfg);
    let all = format!(
        "{} migration(s) applied",
        gpuops::store::migrate::latest(gpuops::store::migrate::SQLITE)
    );
    assert!(ok && text.contains(&all), "{text}");
    let (ok, text) = store_migrate(&cfg);
    assert!(ok && text.contains("0 migration(s) applied"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL: run by .ci/run"]
async fn store_migrate_applies_the_postgres_schema_once() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let url = with_password(&gpuops::store::pg::test_url().await.unwrap());
    let cfg = dir.path().join("bot.toml");
    std::fs::write(
        &cfg,
        format!("[store]\nurl = \"{url}\"\nmigrate_on_start = false\n"),
    )
    .unwrap();
    private(&cfg);
    let (ok, text) = store_migrate(&cfg);
    let all = format!(
        "{} migration(s) applied",
        gpuops::store::migrate::latest(gpuops::store::migrate::POSTGRES)
    );
    assert!(ok && text.contains(&all), "{text}");
    assert!(
        !text.contains("hunter2") && text.contains(":***@"),
        "{text}"
    );
    let (ok, text) = store_migrate(&cfg);
    assert!(ok && text.contains("0 migration(s) applied"), "{text}");
    // Nothing listens there: the error names the database, not its password.
    let closed = format!(
        "postgres://u:pw-hunter2@127.0.0.1:{}/x?sslmode=disable",
        free_port()
    );
    std::fs::write(&cfg, format!("[store]\nurl = \"{closed}\"\n")).unwrap();
    let (ok, text) = store_migrate(&cfg);
    assert!(!ok, "{text}");
    assert!(
        text.contains("127.0.0.1") && !text.contains("hunter2"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL: run by .ci/run"]
async fn a_row_enqueued_by_one_replica_wakes_another_through_notify() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let slack = FakeApi::slack().await;
    let discord = FakeApi::discord().await;
    let url = gpuops::store::pg::test_url().await.unwrap();
    let text = bot_config(dir.path(), &slack, &discord, "");
    let cfg = Arc::new(gpuops::config::BotConfig::from_str(Path::new("t.toml"), &text).unwrap());
    // Replica a only ingests (no worker); replica b only delivers.
    let a = gpuops::store::pg::open_url(&url).await.unwrap();
    let (state_a, _idle) = gpuops::bot::BotState::new(cfg.clone(), a).unwrap();
    let b = gpuops::store::pg::open_url(&url).await.unwrap();
    let (state_b, worker_b) = gpuops::bot::BotState::new(cfg, b.clone()).unwrap();
    let (stop, rx) = tokio::sync::watch::channel(false);
    let outbox = state_b.outbox.clone();
    b.pg()
        .unwrap()
        .spawn_listener(Arc::new(move || outbox.wake()), rx);
    tokio::spawn(worker_b.run(std::future::pending()));
    // Let b's worker find the outbox empty and go to sleep (a 5 s poll).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let sent = Instant::now();
    let resp = gpuops::bot_role::router(state_a.clone())
        .oneshot(
            Request::post("/alertmanager")
                .header("content-type", "application/json")
                .header("authorization", format!("Bearer {TOKEN}"))
                .body(Body::from(am_payload(
                    "GpuNotify",
                    "firing",
                    &[("n1", "critical", "firing")],
                )))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let posted = slack.wait_for(1, Duration::from_secs(10)).await;
    let latency = posted[0].at.duration_since(sent);
    println!("NOTIFY wake-up: posted by the other replica after {latency:?}");
    assert!(
        latency < Duration::from_secs(2),
        "delivered after {latency:?}: by the 5 s poll, not by NOTIFY"
    );
    let _ = stop.send(true);
}
