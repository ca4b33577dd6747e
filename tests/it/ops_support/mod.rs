//! Shared harness of the operations tests: starts the real gpuops agent, a
//! real Prometheus loading the shipped rules, and extracts the dashboard's
//! queries. Every process it starts is killed when its guard drops; every wait
//! has a deadline. Test-only code.
#![allow(clippy::disallowed_methods)] // test support spawns the real binary and external tools
#![allow(dead_code)]

pub use crate::support::free_port;
use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The GPU fixture the agent replays (written by the GPU branch).
pub const GPU_FIXTURE: &str = "tests/fixtures/gpu/h100x8.json";

/// A child process killed (and reaped) on drop; its output goes to a log file
/// that is printed when the test fails.
pub struct Proc {
    pub name: &'static str,
    child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn start(name: &'static str, cmd: &mut Command, dir: &Path) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).expect("create log file");
        let err = out.try_clone().expect("clone log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        Proc { name, child, log }
    }

    /// The last lines of its log, for failure messages.
    pub fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(40);
        format!("--- {} log ---\n{}", self.name, lines[from..].join("\n"))
    }

    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("{}", self.tail());
        }
    }
}

/// Waits until `addr` accepts TCP connections.
pub fn wait_for_port(p: &mut Proc, addr: SocketAddr, within: Duration) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Some(status) = p.exited() {
            panic!("{} exited early ({status})\n{}", p.name, p.tail());
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "{} did not listen on {addr} within {within:?}\n{}",
        p.name,
        p.tail()
    );
}

/// An HTTP client with a deadline on every request.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http client")
}

/// Polls `url` until it answers 200.
pub async fn wait_http_ok(client: &reqwest::Client, p: &mut Proc, url: &str, within: Duration) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Some(status) = p.exited() {
            panic!("{} exited early ({status})\n{}", p.name, p.tail());
        }
        if let Ok(r) = client.get(url).send().await {
            if r.status().is_success() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("{url} not ready within {within:?}\n{}", p.tail());
}

/// The running agent: its address (the `instance` label Prometheus gives it).
pub struct Agent {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub fake_gpus: bool,
}

/// Starts `gpuops agent` on a free port, with the fake 8xH100 fixture when the
/// GPU branch has provided it (and says clearly when it has not).
pub async fn start_agent(dir: &Path) -> Agent {
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gpuops"));
    cmd.current_dir(repo()).env("GPUOPS_LOG", "info").args([
        "agent",
        "--listen",
        &addr.to_string(),
    ]);
    let fixture = repo().join(GPU_FIXTURE);
    let fake_gpus = fixture.is_file();
    if fake_gpus {
        cmd.arg("--gpu-fake").arg(&fixture);
    } else {
        eprintln!(
            "NOTE: {GPU_FIXTURE} does not exist on this branch: the agent runs without \
             GPUs and every GPU query returns no data (expected until the GPU branch merges)"
        );
    }
    let mut proc = Proc::start("agent", &mut cmd, dir);
    wait_http_ok(
        &http(),
        &mut proc,
        &format!("http://{addr}/readyz"),
        Duration::from_secs(30),
    )
    .await;
    Agent {
        proc,
        addr,
        fake_gpus,
    }
}

/// Copies the shipped rule files into `dir` with their evaluation interval cut
/// to 1s (so recording rules have values within seconds); nothing else changes.
pub fn copy_rules_fast(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for name in ["gpuops-alerts.yml", "gpuops-recording.yml"] {
        let text = std::fs::read_to_string(repo().join("config/prometheus/rules").join(name))
            .expect("read rules");
        let text = text.replace("interval: 30s", "interval: 1s");
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write rules");
        out.push(path);
    }
    out
}

pub struct Prometheus {
    pub proc: Proc,
    pub url: String,
}

/// Starts Prometheus scraping the agent every second as job `gpuops-agent`,
/// loading `rule_files`, sending alerts to `alertmanager` when given.
pub async fn start_prometheus(
    dir: &Path,
    agent: SocketAddr,
    rule_files: &[PathBuf],
    alertmanager: Option<SocketAddr>,
) -> Prometheus {
    let port = free_port();
    let rules: Vec<String> = rule_files
        .iter()
        .map(|p| format!("  - {}\n", p.display()))
        .collect();
    let alerting = match alertmanager {
        Some(am) => format!(
            "alerting:\n  alertmanagers:\n    - static_configs:\n        - targets: [\"{am}\"]\n"
        ),
        None => String::new(),
    };
    let cfg = format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
         rule_files:\n{}{alerting}\
         scrape_configs:\n  - job_name: gpuops-agent\n    static_configs:\n      - targets: [\"{agent}\"]\n",
        rules.concat()
    );
    let cfg_path = dir.join("prometheus.yml");
    std::fs::write(&cfg_path, cfg).expect("write prometheus.yml");
    let data = dir.join("prometheus-data");
    let listen = format!("127.0.0.1:{port}");
    let mut cmd = Command::new("prometheus");
    cmd.arg(format!("--config.file={}", cfg_path.display()))
        .arg(format!("--storage.tsdb.path={}", data.display()))
        .arg(format!("--web.listen-address={listen}"))
        .arg("--log.level=warn");
    let mut proc = Proc::start("prometheus", &mut cmd, dir);
    let url = format!("http://{listen}");
    wait_http_ok(
        &http(),
        &mut proc,
        &format!("{url}/-/ready"),
        Duration::from_secs(60),
    )
    .await;
    Prometheus { proc, url }
}

/// Result of one instant query: Ok(number of series) or Err(Prometheus' error).
pub async fn instant_query(
    client: &reqwest::Client,
    prom: &str,
    query: &str,
) -> Result<usize, String> {
    let r = client
        .get(format!("{prom}/api/v1/query"))
        .query(&[("query", query)])
        .send()
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    let status = r.status();
    let body: Value = r
        .json()
        .await
        .map_err(|e| format!("HTTP {status}: not JSON: {e}"))?;
    if body["status"] != "success" {
        return Err(format!(
            "HTTP {status}: {} {}",
            body["errorType"].as_str().unwrap_or("?"),
            body["error"].as_str().unwrap_or("?")
        ));
    }
    let result = &body["data"]["result"];
    Ok(match result.as_array() {
        Some(a) => a.len(),
        None => usize::from(!result.is_null()),
    })
}

/// Waits until the agent's `gpuops_build_info` has been scraped.
pub async fn wait_scraped(client: &reqwest::Client, prom: &mut Prometheus) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(n) = instant_query(client, &prom.url, "gpuops_build_info").await {
            if n > 0 {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    panic!("prometheus never scraped the agent\n{}", prom.proc.tail());
}

/// Waits until every loaded rule has been evaluated at least once and returns
/// the `/api/v1/rules` groups.
pub async fn wait_rules_evaluated(client: &reqwest::Client, prom: &Prometheus) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let body: Value = client
            .get(format!("{}/api/v1/rules", prom.url))
            .send()
            .await
            .expect("GET /api/v1/rules")
            .json()
            .await
            .expect("rules JSON");
        let groups = body["data"]["groups"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let unknown = groups
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .filter(|r| r["health"] == "unknown")
            .count();
        if (!groups.is_empty() && unknown == 0) || Instant::now() > deadline {
            return groups;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Number of rules in the shipped rule files.
pub fn shipped_rule_count() -> usize {
    let mut n = 0;
    for name in ["gpuops-alerts.yml", "gpuops-recording.yml"] {
        let text = std::fs::read_to_string(repo().join("config/prometheus/rules").join(name))
            .expect("read rules");
        let doc: serde_norway::Value = serde_norway::from_str(&text).expect("rules YAML");
        for g in doc["groups"].as_sequence().expect("groups") {
            n += g["rules"].as_sequence().map_or(0, |r| r.len());
        }
    }
    n
}

/// One dashboard query: where it is, and its text.
#[derive(Debug, Clone)]
pub struct DashQuery {
    pub panel: String,
    pub expr: String,
}

/// Every PromQL expression of the dashboard's panels (rows included).
pub fn dashboard_queries(dashboard: &Value) -> Vec<DashQuery> {
    fn walk(panels: &Value, out: &mut Vec<DashQuery>) {
        for p in panels.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("?").to_string();
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(e) = t["expr"].as_str() {
                    out.push(DashQuery {
                        panel: title.clone(),
                        expr: e.to_string(),
                    });
                }
            }
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// `label_values(...)` definitions of the dashboard's query variables.
pub fn dashboard_variable_queries(dashboard: &Value) -> Vec<(String, String)> {
    dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["type"] == "query")
        .map(|v| {
            let q = v["query"]["query"]
                .as_str()
                .or(v["query"].as_str())
                .unwrap_or_default();
            (v["name"].as_str().unwrap_or("?").to_string(), q.to_string())
        })
        .collect()
}

/// Replaces Grafana's variables the way Grafana would for one node, all GPUs
/// (or GPU 0 in the per-GPU repeated row) and a 1m rate interval.
pub fn substitute(expr: &str, node: &str) -> String {
    expr.replace("gpu=~\"$gpu\"", "gpu=~\".*\"")
        .replace("gpu=\"$gpu\"", "gpu=\"0\"")
        .replace("$node", node)
        .replace("$__rate_interval", "1m")
        .replace("$__interval", "15s")
        .replace("$__range", "1h")
}

pub fn load_dashboard() -> Value {
    let path = repo().join("config/grafana/gpuops-node.json");
    let text = std::fs::read_to_string(&path).expect("read dashboard");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every series name the agent exports, read from the generated metric
/// reference (`docs/metrics.md`, kept in sync with the agent by
/// `tests/it/metric_reference.rs`), with histogram series suffixes, plus
/// Prometheus' `up`.
pub fn contract_metrics() -> BTreeSet<String> {
    let doc = std::fs::read_to_string(repo().join("docs/metrics.md")).expect("docs/metrics.md");
    let mut out = BTreeSet::from(["up".to_string()]);
    for row in doc.lines().filter_map(|l| l.strip_prefix("| `")) {
        let mut cells = row.split('|');
        let name = cells.next().unwrap_or("").trim().trim_end_matches('`');
        let kind = cells.next().unwrap_or("").trim();
        if kind == "histogram" {
            for suffix in ["_bucket", "_sum", "_count"] {
                out.insert(format!("{name}{suffix}"));
            }
        } else {
            out.insert(name.to_string());
        }
    }
    out
}

/// PromQL words that are not series names.
const PROMQL_WORDS: &[&str] = &[
    "sum",
    "avg",
    "max",
    "min",
    "count",
    "topk",
    "bottomk",
    "quantile",
    "stddev",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "rate",
    "irate",
    "increase",
    "delta",
    "idelta",
    "changes",
    "resets",
    "max_over_time",
    "min_over_time",
    "avg_over_time",
    "last_over_time",
    "sum_over_time",
    "count_over_time",
    "histogram_quantile",
    "predict_linear",
    "deriv",
    "quantile_over_time",
    "stddev_over_time",
    "present_over_time",
    "absent_over_time",
    "label_replace",
    "clamp_min",
    "clamp_max",
    "abs",
    "absent",
    "time",
    "timestamp",
    "vector",
    "scalar",
    "sort",
    "sort_desc",
    "label_values",
];

/// Series names an expression reads: identifiers left once strings, label
/// matchers, grouping clauses, ranges and PromQL words are removed.
pub fn series_names(expr: &str) -> BTreeSet<String> {
    let strings = regex::Regex::new(r#""[^"]*""#).unwrap();
    let matchers = regex::Regex::new(r"\{[^}]*\}").unwrap();
    let grouping =
        regex::Regex::new(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
            .unwrap();
    let ranges = regex::Regex::new(r"\[[^\]]*\]").unwrap();
    let durations = regex::Regex::new(r"\boffset\s+\d+[smhdwy]").unwrap();
    let ident = regex::Regex::new(r"[A-Za-z_:][A-Za-z0-9_:]*").unwrap();
    let e = strings.replace_all(expr, "");
    let e = matchers.replace_all(&e, " ");
    let e = grouping.replace_all(&e, " ");
    let e = ranges.replace_all(&e, " ");
    let e = durations.replace_all(&e, " ");
    ident
        .find_iter(&e)
        .map(|m| m.as_str().to_string())
        .filter(|w| !PROMQL_WORDS.contains(&w.as_str()))
        .filter(|w| !w.chars().next().is_some_and(|c| c.is_ascii_digit()))
        .collect()
}

/// Evaluates every dashboard query (and variable) against `prom`; panics on any
/// query error, returns the queries that returned no series.
pub async fn check_dashboard_queries(
    client: &reqwest::Client,
    prom: &str,
    node: &str,
) -> (usize, Vec<DashQuery>) {
    let dash = load_dashboard();
    let queries = dashboard_queries(&dash);
    assert!(queries.len() >= 10, "only {} queries", queries.len());
    let mut errors = Vec::new();
    let mut empty = Vec::new();
    for q in &queries {
        let expr = substitute(&q.expr, node);
        match instant_query(client, prom, &expr).await {
            Ok(0) => empty.push(q.clone()),
            Ok(_) => {}
            Err(e) => errors.push(format!("{}: {expr}: {e}", q.panel)),
        }
    }
    // Variables: label_values(<selector>, label) is a series query.
    for (name, q) in dashboard_variable_queries(&dash) {
        let inner = q
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
            .and_then(|r| r.rsplit_once(','))
            .map(|(sel, label)| (substitute(sel, node), label.trim().to_string()));
        let Some((selector, label)) = inner else {
            errors.push(format!("variable {name}: not label_values(): {q}"));
            continue;
        };
        match instant_query(client, prom, &format!("count by ({label}) ({selector})")).await {
            Ok(n) if name == "node" && n == 0 => {
                errors.push(format!("variable node: {q} lists no instance"))
            }
            Ok(_) => {}
            Err(e) => errors.push(format!("variable {name}: {q}: {e}")),
        }
    }
    assert!(
        errors.is_empty(),
        "dashboard queries failed:\n{}",
        errors.join("\n")
    );
    (queries.len(), empty)
}
