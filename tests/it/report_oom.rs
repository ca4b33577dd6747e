//! The report's Host section names OOM victims from the agents'
//! `GET /v1/events`: the real agent router with a fixture event store
//! behind basic auth (reached through `[agents]`'s transport) for one node,
//! an agent on a closed port for another, and a node the inventory does
//! not list; Prometheus is a fake answering the OOM-kills query.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use axum::extract::Query;
use axum::http::{Request, StatusCode};
use axum::middleware::Next;
use axum::response::IntoResponse;
use chrono::{DateTime, Utc};
use gpuops::collector::{Context, KernelEvents, Runner};
use gpuops::config::{AgentConfig, BotConfig};
use gpuops::events::{EventKind, KernelEvent};
use gpuops::exporter::{self, AgentState};
use gpuops::report::victims::{AgentEvents, OomEvents};
use gpuops::report::{build, render, Inputs};
use gpuops::telemetry::HttpMetrics;

/// `report-bot:s3cret`.
const BASIC: &str = "Basic cmVwb3J0LWJvdDpzM2NyZXQ=";

async fn serve(router: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    addr
}

/// A loopback port nothing listens on.
fn closed_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

fn oom(at: f64, pid: u32, process: &str, cgroup: Option<&str>) -> KernelEvent {
    KernelEvent {
        timestamp: at,
        counted: true,
        kind: EventKind::OomKill {
            pid: Some(pid),
            process: Some(process.into()),
            cgroup: cgroup.map(str::to_string),
        },
        message: format!("Out of memory: Killed process {pid} ({process})"),
    }
}

/// The real agent router over a fixture event store, behind basic auth.
async fn agent(events: Vec<KernelEvent>) -> SocketAddr {
    let store = Arc::new(KernelEvents::new());
    for e in events {
        store.record(e);
    }
    let ctx = Arc::new(Context::new(
        Arc::new(AgentConfig::default()),
        store.clone(),
        false,
    ));
    let state = Arc::new(AgentState {
        runner: Arc::new(Runner::new(ctx, Vec::new())),
        events: store,
        http: Arc::new(HttpMetrics::new()),
    });
    let router = exporter::router(state).layer(axum::middleware::from_fn(
        |req: Request<axum::body::Body>, next: Next| async move {
            let ok = req
                .headers()
                .get("authorization")
                .is_some_and(|v| v.as_bytes() == BASIC.as_bytes());
            if ok {
                next.run(req).await
            } else {
                StatusCode::UNAUTHORIZED.into_response()
            }
        },
    ));
    serve(router).await
}

/// Answers the OOM-kills query with `kills` per instance, every other
/// query with nothing.
async fn prometheus(kills: Vec<(String, u64)>) -> SocketAddr {
    let kills = Arc::new(kills);
    let router = axum::Router::new()
        .route(
            "/api/v1/query",
            axum::routing::get(move |q: Query<BTreeMap<String, String>>| {
                let kills = kills.clone();
                async move {
                    let promql = q.0.get("query").cloned().unwrap_or_default();
                    let result: Vec<serde_json::Value> = if promql.contains("oom_kills_total") {
                        kills
                            .iter()
                            .map(|(i, n)| {
                                serde_json::json!({"metric": {"instance": i}, "value": [0, n.to_string()]})
                            })
                            .collect()
                    } else {
                        Vec::new()
                    };
                    axum::Json(serde_json::json!({
                        "status": "success",
                        "data": {"resultType": "vector", "result": result}
                    }))
                    .into_response()
                }
            }),
        )
        .route(
            "/api/v1/query_range",
            axum::routing::get(|| async {
                axum::Json(serde_json::json!({
                    "status": "success",
                    "data": {"resultType": "matrix", "result": []}
                }))
                .into_response()
            }),
        );
    serve(router).await
}

fn config(dir: &Path, prometheus: SocketAddr, agents: &[(SocketAddr, &str)]) -> BotConfig {
    let mut text = format!(
        r#"
[store]
path = "{store}"
[slack]
bot_token = "xoxb-test"
api_url = "http://127.0.0.1:1/api"
[prometheus]
url = "http://{prometheus}"
[agents]
basic_auth_username = "report-bot"
basic_auth_password = "s3cret"
"#,
        store = dir.join("bot.db").display()
    );
    for (addr, node) in agents {
        text.push_str(&format!(
            "[[agents.nodes]]\ninstance = \"{addr}\"\nnode = \"{node}\"\n"
        ));
    }
    text.push_str(
        r#"
[[reports]]
name = "daily"
schedule = "0 9 * * *"
timezone = "Europe/Berlin"
period = "24h"
slack_channel = "C0REPORTS"
"#,
    );
    let path = dir.join("bot.toml");
    std::fs::write(&path, &text).unwrap();
    BotConfig::from_str(&path, &text).unwrap()
}

fn host_line<'a>(markdown: &'a str, instance: &str) -> &'a str {
    markdown
        .lines()
        .find(|l| l.contains(instance) && l.contains("OOM kill"))
        .unwrap_or_else(|| panic!("no OOM line for {instance} in\n{markdown}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_lines_name_oom_victims_from_the_agents_or_say_why_not() {
    let at: DateTime<Utc> = DateTime::from_timestamp(Utc::now().timestamp() / 60 * 60, 0).unwrap();
    let t = at.timestamp() as f64;
    let tz = chrono_tz::Europe::Berlin;
    let mut events = vec![
        oom(t - 2.0 * 86_400.0, 11, "old-job", None),
        oom(
            t - 3600.0,
            77,
            "trainer",
            Some("/system.slice/train.service"),
        ),
        oom(t - 1800.0, 78, "py_worker", Some("/kubepods/pod-1/abc")),
    ];
    // Node c has seven kills: five named, then "+2 more".
    for i in 0..2 {
        events.push(oom(t - 600.0 + f64::from(i), 900 + i, "batch", None));
    }
    let busy: Vec<KernelEvent> = (0..7)
        .map(|i| oom(t - 900.0 + f64::from(i), 500 + i, "spark", None))
        .collect();
    let a = agent(events).await;
    let b = closed_port();
    let c = agent(busy).await;
    let unlisted = "10.9.9.9:9949".to_string();
    let prom = prometheus(vec![
        (a.to_string(), 6),
        (b.to_string(), 1),
        (c.to_string(), 7),
        (unlisted.clone(), 2),
    ])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        prom,
        &[(a, "gpu-a"), (b, "gpu-b"), (c, "gpu-c")],
    );
    let source = AgentEvents::from_config(&cfg).expect("[agents] is configured");
    let built = build(Inputs {
        config: &cfg.reports[0],
        prometheus_url: &format!("http://{prom}"),
        store: None,
        at,
        late: false,
        agent_events: Some(&source as &dyn OomEvents),
        names: &gpuops::inventory::Identity::from_config(&cfg).names().await,
        lifecycle: &Default::default(),
    })
    .await;
    let md = &built.markdown;

    let line_a = host_line(md, &a.to_string());
    assert!(
        line_a.contains("victims: trainer (pid 77, /system.slice/train.service, "),
        "{line_a}"
    );
    assert!(
        line_a.contains(&render::fmt_local(tz, t - 3600.0)),
        "{line_a}"
    );
    // Values from outside are escaped for Markdown.
    assert!(
        line_a.contains(r"py\_worker (pid 78, /kubepods/pod-1/abc, "),
        "{line_a}"
    );
    assert!(line_a.contains("batch (pid 900, "), "{line_a}");
    assert!(!line_a.contains("old-job"), "outside the period: {line_a}");
    assert!(!line_a.contains("more"), "{line_a}");
    // Prometheus counted six kills; the agent holds four of them.
    assert!(
        line_a.contains("; 2 others no longer held by the agent"),
        "{line_a}"
    );
    assert!(line_a.contains("(runbook `oom-kill`)"), "{line_a}");

    let line_b = host_line(md, &b.to_string());
    assert!(
        line_b.contains("victims unknown: agent unreachable"),
        "{line_b}"
    );

    let line_c = host_line(md, &c.to_string());
    assert!(line_c.contains("spark (pid 504, "), "{line_c}");
    assert!(!line_c.contains("pid 505"), "{line_c}");
    assert!(line_c.contains(" +2 more"), "{line_c}");

    let line_u = host_line(md, &unlisted);
    assert!(
        line_u.contains("victims unknown: not in the agent inventory"),
        "{line_u}"
    );

    let victims = &built.figures.oom_victims;
    assert_eq!(victims.len(), 4);
    let got_a = victims[&a.to_string()].as_ref().unwrap();
    assert_eq!(
        got_a
            .iter()
            .map(|v| (v.pid, v.process.as_deref()))
            .collect::<Vec<_>>(),
        vec![
            (Some(77), Some("trainer")),
            (Some(78), Some("py_worker")),
            (Some(900), Some("batch")),
            (Some(901), Some("batch")),
        ]
    );
    assert!(victims[&b.to_string()].is_err());
    // The plain-text part has the value unescaped.
    assert!(
        built.message.text.contains("py_worker (pid 78"),
        "plain text"
    );
    assert!(built.message.html.contains("py_worker (pid 78"), "html");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_basic_auth_the_agent_refuses_and_the_line_says_so() {
    let at: DateTime<Utc> = DateTime::from_timestamp(Utc::now().timestamp(), 0).unwrap();
    let a = agent(vec![oom(at.timestamp() as f64 - 60.0, 1, "x", None)]).await;
    let prom = prometheus(vec![(a.to_string(), 1)]).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), prom, &[(a, "gpu-a")]);
    if let Some(agents) = cfg.agents.as_mut() {
        agents.transport.basic_auth = None;
    }
    let source = AgentEvents::from_config(&cfg).unwrap();
    let built = build(Inputs {
        config: &cfg.reports[0],
        prometheus_url: &format!("http://{prom}"),
        store: None,
        at,
        late: false,
        agent_events: Some(&source),
        names: &gpuops::inventory::Identity::from_config(&cfg).names().await,
        lifecycle: &Default::default(),
    })
    .await;
    let line = host_line(&built.markdown, &a.to_string());
    assert!(
        line.contains("victims unknown: agent answered HTTP 401"),
        "{line}"
    );
    // Unknown victims are not a failed section.
    assert!(
        !built.failures.iter().any(|f| f.starts_with("Host")),
        "{:?}",
        built.failures
    );
}
