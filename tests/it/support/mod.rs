//! Test support: local fake Slack and Discord Web APIs (axum servers) that
//! record every request and answer either like the platform would or with
//! scripted responses (429 with Retry-After, 5xx, permanent errors), plus
//! helpers to run the real `gpuops` binary. The fake Slack also speaks the
//! three-step file upload (`files.getUploadURLExternal` answering with an
//! `upload_url` on the fake itself, the upload `POST`, and
//! `files.completeUploadExternal`) and refuses the retired `files.upload`;
//! every request's raw bytes, query and content type are kept, and
//! [`multipart_parts`] splits a `multipart/form-data` body (Discord's
//! attachments). Reusable by any test:
//! `mod support;` then `support::FakeApi::slack().await`.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

/// One request the fake received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub at: Instant,
    pub method: String,
    pub path: String,
    pub authorization: String,
    pub body: serde_json::Value,
    pub raw: String,
    /// The query string (without `?`).
    pub query: String,
    pub content_type: String,
    /// The body as received.
    pub bytes: Vec<u8>,
}

impl Recorded {
    /// A query parameter (percent-decoded).
    pub fn query_param(&self, name: &str) -> Option<String> {
        url_decode_pairs(&self.query)
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }
}

fn url_decode_pairs(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (pct_decode(k), pct_decode(v))
        })
        .collect()
}

fn pct_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let h = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(h, 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One part of a `multipart/form-data` body.
#[derive(Debug, Clone)]
pub struct FormPart {
    pub name: String,
    pub file_name: Option<String>,
    pub content_type: Option<String>,
    pub data: Vec<u8>,
}

/// The parts of a recorded `multipart/form-data` request (empty when it
/// is not one).
pub fn multipart_parts(r: &Recorded) -> Vec<FormPart> {
    let Some(boundary) = r
        .content_type
        .split(';')
        .map(str::trim)
        .find_map(|p| p.strip_prefix("boundary="))
        .map(|b| b.trim_matches('"').to_string())
    else {
        return Vec::new();
    };
    let delim = format!("--{boundary}").into_bytes();
    let body = &r.bytes;
    let mut starts = Vec::new();
    let mut i = 0;
    while i + delim.len() <= body.len() {
        if body[i..i + delim.len()] == delim[..] {
            starts.push(i);
            i += delim.len();
        } else {
            i += 1;
        }
    }
    let mut parts = Vec::new();
    for w in starts.windows(2) {
        let mut chunk = &body[w[0] + delim.len()..w[1]];
        chunk = chunk.strip_prefix(b"\r\n").unwrap_or(chunk);
        chunk = chunk.strip_suffix(b"\r\n").unwrap_or(chunk);
        let Some(split) = chunk.windows(4).position(|x| x == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&chunk[..split]).into_owned();
        let data = chunk[split + 4..].to_vec();
        let mut part = FormPart {
            name: String::new(),
            file_name: None,
            content_type: None,
            data,
        };
        for line in head.split("\r\n") {
            let lower = line.to_ascii_lowercase();
            if lower.starts_with("content-disposition:") {
                for attr in line.split(';').map(str::trim) {
                    if let Some(v) = attr.strip_prefix("name=") {
                        part.name = v.trim_matches('"').to_string();
                    } else if let Some(v) = attr.strip_prefix("filename=") {
                        part.file_name = Some(v.trim_matches('"').to_string());
                    }
                }
            } else if lower.starts_with("content-type:") {
                part.content_type = Some(line["content-type:".len()..].trim().to_string());
            }
        }
        parts.push(part);
    }
    parts
}

/// A canned answer for the next matching request.
#[derive(Debug, Clone)]
pub struct Scripted {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: serde_json::Value,
}

impl Scripted {
    pub fn new(status: u16, body: serde_json::Value) -> Scripted {
        Scripted {
            status,
            headers: Vec::new(),
            body,
        }
    }

    pub fn header(mut self, k: &str, v: &str) -> Scripted {
        self.headers.push((k.into(), v.into()));
        self
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Slack,
    Discord,
}

struct Inner {
    kind: Kind,
    requests: Vec<Recorded>,
    script: VecDeque<Scripted>,
    /// Answers for the next request whose path contains the pattern.
    path_script: Vec<(String, Scripted)>,
    addr: Option<SocketAddr>,
    /// Answer every request with 503 while set.
    down: bool,
    next_id: u64,
}

/// A fake platform API on 127.0.0.1.
#[derive(Clone)]
pub struct FakeApi {
    pub addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
}

impl FakeApi {
    /// Slack Web API at `url()` (use as `[slack] api_url`).
    pub async fn slack() -> FakeApi {
        FakeApi::start(Kind::Slack, "127.0.0.1:0").await
    }

    /// Discord API at `url()` (use as `[discord] api_url`).
    pub async fn discord() -> FakeApi {
        FakeApi::start(Kind::Discord, "127.0.0.1:0").await
    }

    /// Starts on a given address (e.g. to come back on the same port).
    pub async fn start(kind: Kind, addr: &str) -> FakeApi {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let inner = Arc::new(Mutex::new(Inner {
            kind,
            requests: Vec::new(),
            script: VecDeque::new(),
            path_script: Vec::new(),
            addr: Some(addr),
            down: false,
            next_id: 1,
        }));
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(inner.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeApi { addr, inner }
    }

    pub fn url(&self) -> String {
        match self.inner.lock().unwrap().kind {
            Kind::Slack => format!("http://{}/api", self.addr),
            Kind::Discord => format!("http://{}", self.addr),
        }
    }

    /// Queues answers for the next requests (first in, first out).
    pub fn script(&self, responses: impl IntoIterator<Item = Scripted>) {
        self.inner.lock().unwrap().script.extend(responses);
    }

    /// Queues an answer for the next request whose path contains
    /// `pattern` (e.g. `/upload/`, `files.completeUploadExternal`).
    pub fn script_path(&self, pattern: &str, response: Scripted) {
        self.inner
            .lock()
            .unwrap()
            .path_script
            .push((pattern.to_string(), response));
    }

    /// The requests whose path ends with `suffix`.
    pub fn calls(&self, suffix: &str) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.path.ends_with(suffix))
            .collect()
    }

    pub fn set_down(&self, down: bool) {
        self.inner.lock().unwrap().down = down;
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.inner.lock().unwrap().requests.clone()
    }

    /// Waits until at least `n` requests arrived (panics after `timeout`).
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Recorded> {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.requests();
            if r.len() >= n {
                return r;
            }
            if Instant::now() > deadline {
                panic!(
                    "expected {n} requests within {timeout:?}, got {}: {r:#?}",
                    r.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Asserts that no more than `n` requests arrive within `quiet`.
    pub async fn expect_no_more(&self, n: usize, quiet: Duration) {
        tokio::time::sleep(quiet).await;
        let r = self.requests();
        assert_eq!(r.len(), n, "unexpected requests: {r:#?}");
    }
}

async fn handle(
    State(inner): State<Arc<Mutex<Inner>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let raw = String::from_utf8_lossy(&body).into_owned();
    let json: serde_json::Value = serde_json::from_str(&raw).unwrap_or(serde_json::Value::Null);
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let mut g = inner.lock().unwrap();
    g.requests.push(Recorded {
        at: Instant::now(),
        method: method.to_string(),
        path: uri.path().to_string(),
        authorization: headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string(),
        body: json.clone(),
        raw,
        query: uri.query().unwrap_or("").to_string(),
        content_type,
        bytes: body.to_vec(),
    });
    if g.down {
        return (StatusCode::SERVICE_UNAVAILABLE, "down").into_response();
    }
    let path = uri.path().to_string();
    if let Some(i) = g
        .path_script
        .iter()
        .position(|(p, _)| path.contains(p.as_str()))
    {
        let (_, s) = g.path_script.remove(i);
        let mut resp =
            (StatusCode::from_u16(s.status).unwrap(), axum::Json(s.body)).into_response();
        for (k, v) in s.headers {
            resp.headers_mut().insert(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        return resp;
    }
    if let Some(s) = g.script.pop_front() {
        let mut resp =
            (StatusCode::from_u16(s.status).unwrap(), axum::Json(s.body)).into_response();
        for (k, v) in s.headers {
            resp.headers_mut().insert(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        return resp;
    }
    let id = g.next_id;
    g.next_id += 1;
    match g.kind {
        Kind::Slack if path.ends_with("files.getUploadURLExternal") => {
            let addr = g.addr.map(|a| a.to_string()).unwrap_or_default();
            axum::Json(serde_json::json!({
                "ok": true,
                "upload_url": format!("http://{addr}/upload/F{id:05}"),
                "file_id": format!("F{id:05}"),
            }))
            .into_response()
        }
        Kind::Slack if path.starts_with("/upload/") => (
            [("content-type", "text/plain")],
            format!("OK - {}", body.len()),
        )
            .into_response(),
        Kind::Slack if path.ends_with("files.completeUploadExternal") => {
            let files: Vec<serde_json::Value> = json["files"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(|f| serde_json::json!({"id": f["id"], "title": f["title"]}))
                .collect();
            axum::Json(serde_json::json!({"ok": true, "files": files})).into_response()
        }
        // Retired by Slack; answered the way Slack answers new apps.
        Kind::Slack if path.ends_with("files.upload") => axum::Json(serde_json::json!({
            "ok": false, "error": "method_deprecated"
        }))
        .into_response(),
        Kind::Slack => {
            let channel = json["channel"].as_str().unwrap_or("").to_string();
            let ts = if uri.path().ends_with("chat.update") {
                json["ts"].as_str().unwrap_or("").to_string()
            } else {
                format!("1700000000.{id:06}")
            };
            axum::Json(serde_json::json!({
                "ok": true, "channel": channel, "ts": ts,
                "message": {"ts": ts, "text": json["text"]}
            }))
            .into_response()
        }
        Kind::Discord => {
            let parts: Vec<&str> = uri.path().split('/').collect();
            // PUT /api/v10/applications/{a}/commands: the commands as
            // Discord registers them (ids, application id, version added).
            if method == Method::PUT
                && parts.get(3) == Some(&"applications")
                && parts.get(5) == Some(&"commands")
            {
                let app = parts.get(4).copied().unwrap_or("");
                let registered: Vec<serde_json::Value> = json
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .enumerate()
                    .map(|(i, mut c)| {
                        let cid = 1_300_000_000_000_000_000u64 + 100 * id + i as u64;
                        c["id"] = serde_json::json!(cid.to_string());
                        c["application_id"] = serde_json::json!(app);
                        c["version"] = serde_json::json!((cid + 1).to_string());
                        c["default_member_permissions"] = serde_json::Value::Null;
                        c
                    })
                    .collect();
                return axum::Json(registered).into_response();
            }
            // /api/v10/channels/{c}/messages[/{m}]
            let channel = parts.get(4).copied().unwrap_or("").to_string();
            let message_id = match parts.get(6) {
                Some(m) => m.to_string(),
                None => (900_000_000_000_000_000u64 + id).to_string(),
            };
            axum::Json(serde_json::json!({
                "id": message_id, "channel_id": channel, "content": json["content"]
            }))
            .into_response()
        }
    }
}

/// A standard AlertManager v4 payload for one group.
pub fn am_payload(group: &str, status: &str, alerts: &[(&str, &str, &str)]) -> String {
    // alerts: (instance, severity, status)
    let list: Vec<serde_json::Value> = alerts
        .iter()
        .map(|(instance, severity, st)| {
            serde_json::json!({
                "status": st,
                "labels": {"alertname": group, "severity": severity, "instance": instance, "gpu": "0"},
                "annotations": {"summary": format!("{group} on {instance}"), "description": "details"},
                "startsAt": "2026-01-01T00:00:00Z",
                "endsAt": "0001-01-01T00:00:00Z",
                "generatorURL": "http://prometheus:9090/graph?g0.expr=up",
                "fingerprint": format!("{group}-{instance}")
            })
        })
        .collect();
    let common_severity = alerts.first().map(|a| a.1).unwrap_or("");
    let same = alerts.iter().all(|a| a.1 == common_severity);
    let mut common = serde_json::json!({"alertname": group});
    if same {
        common["severity"] = common_severity.into();
    }
    serde_json::json!({
        "version": "4",
        "groupKey": format!("{{}}:{{alertname=\"{group}\"}}"),
        "truncatedAlerts": 0,
        "status": status,
        "receiver": "gpuops",
        "groupLabels": {"alertname": group},
        "commonLabels": common,
        "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093",
        "alerts": list
    })
    .to_string()
}

/// A bot configuration pointing at the fakes: P1/P2 → `CP1` / `1001`,
/// P3 → `CP3` / `3003`, P4 → console. Fast retries for tests.
pub fn bot_config(dir: &Path, slack: &FakeApi, discord: &FakeApi, extra: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
webhook_token = "hook-token-s3cret"
[store]
path = "{db}"
[log]
format = "json"
level = "info"
[slack]
bot_token = "xoxb-test-token-s3cret"
signing_secret = "slack-signing-s3cret"
api_url = "{slack}"
[discord]
bot_token = "discord-token-s3cret"
application_id = "42"
api_url = "{discord}"
[routing]
default_tier = "P3"
[[routing.destinations]]
tiers = ["P1", "P2"]
slack_channel = "CP1"
discord_channel = "1001"
[[routing.destinations]]
tiers = ["P3"]
slack_channel = "CP3"
discord_channel = "3003"
[[routing.destinations]]
tiers = ["P4"]
console = true
[delivery]
timeout_secs = 2.0
backoff_initial_secs = 0.2
backoff_max_secs = 1.0
{extra}
"#,
        db = dir.join("bot.db").display(),
        slack = slack.url(),
        discord = discord.url(),
    )
}

/// The `gpuops` binary built for this test run.
pub fn gpuops() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_gpuops"))
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Writes `content` (a script) to `path`, executable (0755).
pub fn executable(path: &Path, content: &str) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, content).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A directory of executable stand-ins (each `exit 0`) named `names`.
pub fn fake_bins(names: &[&str]) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for n in names {
        executable(&d.path().join(n), "#!/bin/sh\nexit 0\n");
    }
    d
}

/// One shared directory of stand-ins for the binaries the shipped runbooks
/// name (this machine has no Slurm, Kubernetes, NVIDIA driver or sudo), to
/// put first on a runbook executor's search path: steps are then planned
/// as they would be on a GPU node (the commands themselves go to a test runner).
pub fn fake_node_bins() -> &'static Path {
    static BINS: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    BINS.get_or_init(|| {
        fake_bins(&[
            "kubectl",
            "nvidia-smi",
            "sysctl",
            "fuser",
            "nvidia-bug-report.sh",
            "scontrol",
            "sudo",
            "dcgmi",
            "lspci",
            "journalctl",
        ])
    })
    .path()
}

/// A child process killed (and reaped) when dropped.
pub struct Proc(pub std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits (up to 30 s) until something accepts TCP connections on `addr`;
/// `what` names it in the failure.
pub fn wait_listening(addr: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "{what} did not listen on {addr}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until `GET url` answers 200.
pub async fn wait_http_ok(url: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let client = reqwest::Client::new();
    loop {
        if let Ok(r) = client.get(url).send().await {
            if r.status().is_success() {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{url} did not come up within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

tokio::task_local! {
    /// Set while a test runs on PostgreSQL (see [`on_both`]).
    static ON_POSTGRES: ();
}

/// Runs `f` with [`open_store`] opening PostgreSQL stores.
pub async fn on_postgres<F: std::future::Future>(f: F) -> F::Output {
    ON_POSTGRES.scope((), f).await
}

/// The store a test bot uses: SQLite at `[store] path` normally; inside
/// [`on_postgres`], a schema on the server `.ci/run` started, one per path
/// (a restarted bot finds its data again; the test fails when
/// `GPUOPS_TEST_POSTGRES_URL` is unset).
pub async fn open_store(cfg: &gpuops::config::BotConfig) -> gpuops::store::Store {
    open_store_at(&cfg.store.path).await
}

/// [`open_store`] by path.
pub async fn open_store_at(path: &Path) -> gpuops::store::Store {
    static SCHEMAS: Mutex<Vec<(PathBuf, String)>> = Mutex::new(Vec::new());
    if ON_POSTGRES.try_with(|_| ()).is_err() {
        return gpuops::store::Store::open(path).unwrap();
    }
    let known = SCHEMAS
        .lock()
        .unwrap()
        .iter()
        .find(|(p, _)| p == path)
        .map(|(_, u)| u.clone());
    let url = match known {
        Some(u) => u,
        None => {
            let u = gpuops::store::pg::test_url()
                .await
                .expect("a PostgreSQL test schema");
            SCHEMAS
                .lock()
                .unwrap()
                .push((path.to_path_buf(), u.clone()));
            u
        }
    };
    gpuops::store::pg::open_url(&url)
        .await
        .expect("a PostgreSQL test store")
}

/// Each listed `async fn` becomes a module with two tests: `sqlite`, and
/// `postgres` (ignored in plain `cargo test`; `.ci/run` includes it).
#[macro_export]
macro_rules! on_both {
    ($($case:ident),* $(,)?) => {$(
        mod $case {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$case().await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            #[ignore = "needs PostgreSQL: run by .ci/run"]
            async fn postgres() {
                super::support::on_postgres(super::$case()).await
            }
        }
    )*};
}

/// One call a recording stand-in (see [`recording_bins`]) received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StandInCall {
    /// `sudo` when the stand-in `sudo` ran it, else empty.
    pub via: String,
    /// Its argv as received, `argv[0]` the path it was run by.
    pub argv: Vec<String>,
}

impl StandInCall {
    /// The program's file name (`scontrol`).
    pub fn program(&self) -> &str {
        self.argv
            .first()
            .map(|a| a.rsplit('/').next().unwrap_or(a))
            .unwrap_or("")
    }
}

/// Writes recording stand-ins into `dir` (created): each of `names` appends
/// its argv to `log`, one line per call (fields separated by `\x1f`: who
/// ran it, then `argv[0]`, then each argument), prints the text given for
/// it in `stdout` (if any) and exits 0 (1 for those in `failing`). A
/// `sudo` among `names` records its
/// call, answers `sudo -n -l <command>` with the command (allowed) and
/// otherwise runs the stand-in of the same file name in `dir` (never the
/// command's own path: a real `systemctl` found first on a search path is
/// never run), or exits 127 when there is none. Read the log with
/// [`stand_in_calls`].
pub fn recording_bins(
    dir: &Path,
    log: &Path,
    names: &[&str],
    stdout: &[(&str, &str)],
    failing: &[&str],
) {
    std::fs::create_dir_all(dir).unwrap();
    let record = format!(
        "{{ printf '%s' \"$STANDIN_VIA\"; for a in \"$0\" \"$@\"; do printf '\\037%s' \"$a\"; done; printf '\\n'; }} >> '{}'\n",
        log.display()
    );
    for name in names {
        let mut script = format!("#!/bin/sh\n{record}");
        if *name == "sudo" {
            script.push_str(&format!(
                r#"list=
while [ $# -gt 0 ]; do
  case "$1" in
    -l) list=1; shift ;;
    -u|-g|-C|-D|-h|-p|-r|-t|-T|-U|-R) shift 2 ;;
    --) shift; break ;;
    -*) shift ;;
    *) break ;;
  esac
done
[ $# -gt 0 ] || exit 1
if [ -n "$list" ]; then echo "$1"; exit 0; fi
cmd=$(basename "$1"); shift
[ -x '{dir}'/"$cmd" ] || {{ echo "sudo stand-in: no stand-in for $cmd" >&2; exit 127; }}
STANDIN_VIA=sudo exec '{dir}'/"$cmd" "$@"
"#,
                dir = dir.display()
            ));
        } else {
            if let Some((_, out)) = stdout.iter().find(|(n, _)| n == name) {
                script.push_str(&format!("cat <<'STANDIN_EOF'\n{out}\nSTANDIN_EOF\n"));
            }
            script.push_str(if failing.contains(name) {
                "exit 1\n"
            } else {
                "exit 0\n"
            });
        }
        executable(&dir.join(name), &script);
    }
}

/// The calls recorded in `log` by [`recording_bins`]' stand-ins, in order
/// (none when nothing ran yet).
pub fn stand_in_calls(log: &Path) -> Vec<StandInCall> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let mut fields = l.split('\x1f').map(str::to_string);
            let via = fields.next().unwrap_or_default();
            StandInCall {
                via,
                argv: fields.collect(),
            }
        })
        .collect()
}

/// One GET on a new connection to 127.0.0.1:`port` (`Connection: close`):
/// the status and the body.
pub fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = raw
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Ok((status, body))
}
