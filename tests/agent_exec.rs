//! The agent's `POST /v1/exec`: signatures (valid, stale, replayed,
//! mis-signed, unsigned → 401), lookups (404/400), and the step timeout and
//! output cap enforced on real processes. Then the bot side end to end: the
//! engine's AgentClient signs a node step, a real agent router runs it.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt as _;
use tower::ServiceExt as _;

use gpuops::config::agent::ExecConfig;
use gpuops::config::Secret;
use gpuops::runbook::agent_exec::{self, ExecState};
use gpuops::runbook::engine::{
    self, AgentClient, Executor, NodeSteps, StepExecutor as _, StepStatus,
};
use gpuops::runbook::exec::{ProcessRunner, RecordingRunner, TRUNCATION_MARKER};
use gpuops::signing::{self, ExecVerifier, FixedClock, SystemClock};

const SECRET: &[u8] = b"test-exec-secret-0123456789";
const NOW: i64 = 1_800_000_000;
const CAP: usize = 1024;

const RUNBOOK: &str = r#"
id: node-test
title: Node test
params:
  word: { pattern: '[a-z]{1,10}', default: hello }
  instance: { pattern: '[A-Za-z0-9.:_-]{1,255}', from_label: instance, default: none }
steps:
  - { name: hello, phase: investigate, kind: command, target: node, timeout: 5s, run: [echo, "{{word}}"] }
  - { name: slow, phase: investigate, kind: command, target: node, timeout: 1s, run: [sleep, "30"] }
  - { name: flood, phase: investigate, kind: command, target: node, timeout: 20s, run: [seq, "1", "1000000"] }
  - { name: fails, phase: investigate, kind: command, target: node, timeout: 5s, run: [ls, /gpuops-no-such-dir] }
  - { name: on-bot, phase: investigate, kind: command, target: bot, run: [echo, bot] }
  - { name: q, phase: investigate, kind: promql, query: 'up{instance="{{instance}}"}' }
"#;

fn runbook_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("node-test.yaml"), RUNBOOK).unwrap();
    std::fs::write(dir.path().join("broken.yaml"), "id: broken\n").unwrap();
    dir
}

fn router(dir: &Path, clock: Arc<FixedClock>) -> axum::Router {
    let state = ExecState::new(
        ExecVerifier::with_clock(SECRET, clock),
        dir.to_path_buf(),
        CAP,
        Arc::new(ProcessRunner),
    );
    agent_exec::router_with(Arc::new(state))
}

fn signed(body: &str, secret: &[u8], ts: i64) -> Request<Body> {
    let mut b = Request::post("/v1/exec").header("content-type", "application/json");
    for (k, v) in signing::exec_headers(secret, ts, body.as_bytes()) {
        b = b.header(k, v);
    }
    b.body(Body::from(body.to_string())).unwrap()
}

async fn send(app: &axum::Router, req: Request<Body>) -> (StatusCode, serde_json::Value) {
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&bytes).into()));
    (status, json)
}

fn body(step: &str, params: &[(&str, &str)]) -> String {
    let params: BTreeMap<&str, &str> = params.iter().copied().collect();
    serde_json::json!({"runbook": "node-test", "step": step, "params": params}).to_string()
}

#[tokio::test]
async fn signatures_unsigned_stale_replayed_mis_signed_get_401() {
    let dir = runbook_dir();
    let app = router(dir.path(), Arc::new(FixedClock::new(NOW)));
    let b = body("hello", &[]);

    let unsigned = Request::post("/v1/exec")
        .body(Body::from(b.clone()))
        .unwrap();
    assert_eq!(send(&app, unsigned).await.0, StatusCode::UNAUTHORIZED);

    let stale = signed(&b, SECRET, NOW - 301);
    assert_eq!(send(&app, stale).await.0, StatusCode::UNAUTHORIZED);
    let future = signed(&b, SECRET, NOW + 301);
    assert_eq!(send(&app, future).await.0, StatusCode::UNAUTHORIZED);

    let wrong_key = signed(&b, b"another-secret", NOW);
    assert_eq!(send(&app, wrong_key).await.0, StatusCode::UNAUTHORIZED);

    // Signed for one body, sent with another.
    let mut tampered = signed(&b, SECRET, NOW);
    *tampered.body_mut() = Body::from(body("hello", &[("word", "evil")]));
    assert_eq!(send(&app, tampered).await.0, StatusCode::UNAUTHORIZED);

    // Valid once; the very same request again is a replay.
    let mut builder = Request::post("/v1/exec");
    let headers = signing::exec_headers(SECRET, NOW - 200, b.as_bytes());
    for (k, v) in &headers {
        builder = builder.header(*k, v);
    }
    let first = builder.body(Body::from(b.clone())).unwrap();
    let (status, json) = send(&app, first).await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(json["stdout"], "hello\n");
    assert_eq!(json["exit_code"], 0);
    let mut builder = Request::post("/v1/exec");
    for (k, v) in &headers {
        builder = builder.header(*k, v);
    }
    let replay = builder.body(Body::from(b.clone())).unwrap();
    assert_eq!(send(&app, replay).await.0, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn lookups_and_validation() {
    let dir = runbook_dir();
    let app = router(dir.path(), Arc::new(FixedClock::new(NOW)));
    let check = |body: String, status: StatusCode, error_contains: &'static str| {
        let app = app.clone();
        async move {
            let (got, json) = send(&app, signed(&body, SECRET, NOW)).await;
            assert_eq!(got, status, "{body}: {json}");
            let err = json["error"].as_str().unwrap_or("");
            assert!(err.contains(error_contains), "{body}: {json}");
        }
    };
    check(
        r#"{"runbook":"nope","step":"hello"}"#.into(),
        StatusCode::NOT_FOUND,
        "no runbook nope on this node",
    )
    .await;
    check(
        r#"{"runbook":"../../etc/passwd","step":"hello"}"#.into(),
        StatusCode::NOT_FOUND,
        "no such runbook",
    )
    .await;
    check(body("nope", &[]), StatusCode::NOT_FOUND, "has no step nope").await;
    check(
        body("on-bot", &[]),
        StatusCode::BAD_REQUEST,
        "the agent runs only node commands",
    )
    .await;
    check(
        body("q", &[]),
        StatusCode::BAD_REQUEST,
        "the agent runs only node commands",
    )
    .await;
    check(
        body("hello", &[("word", "$(reboot)")]),
        StatusCode::BAD_REQUEST,
        "parameter word: \"$(reboot)\" does not match pattern [a-z]{1,10}",
    )
    .await;
    check(
        body("hello", &[("extra", "x")]),
        StatusCode::BAD_REQUEST,
        "runbook node-test has no such parameter",
    )
    .await;
    check(
        r#"{"runbook":"node-test","step":"hello","argv":["sh"]}"#.into(),
        StatusCode::BAD_REQUEST,
        "unknown field",
    )
    .await;
    check("not json".into(), StatusCode::BAD_REQUEST, "body must be").await;
    check(
        r#"{"runbook":"broken","step":"x"}"#.into(),
        StatusCode::INTERNAL_SERVER_ERROR,
        "runbook broken on this node is invalid",
    )
    .await;
    let huge = format!(
        r#"{{"runbook":"node-test","step":"hello","params":{{"word":"{}"}}}}"#,
        "a".repeat(70_000)
    );
    check(huge, StatusCode::PAYLOAD_TOO_LARGE, "body larger than").await;
}

#[tokio::test]
async fn step_timeout_and_output_cap_are_enforced() {
    let dir = runbook_dir();
    let app = router(dir.path(), Arc::new(FixedClock::new(NOW)));

    let started = std::time::Instant::now();
    let (status, json) = send(&app, signed(&body("slow", &[]), SECRET, NOW)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json["timed_out"], true, "{json}");
    assert_eq!(json["exit_code"], serde_json::Value::Null);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let d = json["duration_seconds"].as_f64().unwrap();
    assert!((0.9..4.0).contains(&d), "{d}");

    let (status, json) = send(&app, signed(&body("flood", &[]), SECRET, NOW)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json["truncated"], true);
    assert_eq!(json["exit_code"], 0);
    let stdout = json["stdout"].as_str().unwrap();
    assert_eq!(stdout.len(), CAP + TRUNCATION_MARKER.len());
    assert!(stdout.starts_with("1\n2\n3\n") && stdout.ends_with(TRUNCATION_MARKER));

    let (_, json) = send(&app, signed(&body("fails", &[]), SECRET, NOW)).await;
    assert_eq!(json["exit_code"], 2, "{json}");
    assert!(
        json["stderr"].as_str().unwrap().contains("No such file"),
        "{json}"
    );
}

#[test]
fn exec_is_off_without_a_secret() {
    let cfg = ExecConfig {
        secret: None,
        runbooks_dir: "/nonexistent".into(),
        output_cap_bytes: CAP,
    };
    assert!(agent_exec::router(&cfg).is_none());
    let cfg = ExecConfig {
        secret: Some(Secret::new("s")),
        ..cfg
    };
    assert!(agent_exec::router(&cfg).is_some());
}

/// Serves `app` on a free local port; returns its address.
async fn serve(app: axum::Router) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

#[tokio::test]
async fn bot_runs_node_steps_on_the_agent_end_to_end() {
    let dir = runbook_dir();
    let state = ExecState::new(
        ExecVerifier::with_clock(SECRET, SystemClock),
        dir.path().to_path_buf(),
        CAP,
        Arc::new(ProcessRunner),
    );
    let agent = serve(agent_exec::router_with(Arc::new(state))).await;

    // A fake Prometheus answering /api/v1/query.
    let prom = serve(axum::Router::new().route(
        "/api/v1/query",
        axum::routing::get(|q: axum::extract::Query<BTreeMap<String, String>>| async move {
            axum::Json(serde_json::json!({
                "status": "success",
                "data": {"resultType": "vector", "result": [
                    {"metric": {"__name__": "up", "instance": q.0.get("query").cloned().unwrap_or_default()}, "value": [1, "1"]}
                ]}
            }))
        }),
    ))
    .await;

    let rb = gpuops::runbook::parse_runbook(Path::new("node-test.yaml"), RUNBOOK).unwrap();
    let labels: BTreeMap<String, String> = [
        ("alertname".to_string(), "Test".to_string()),
        ("instance".to_string(), agent.to_string()),
    ]
    .into_iter()
    .collect();
    let given = [("word".to_string(), "world".to_string())]
        .into_iter()
        .collect();
    let plan = engine::plan(&rb, &given, &labels).unwrap();
    let bot_runner = Arc::new(RecordingRunner::new());
    let exec = Executor::new(
        bot_runner.clone(),
        NodeSteps::Agent(AgentClient::new(
            "http://{instance}",
            Secret::new(String::from_utf8(SECRET.to_vec()).unwrap()),
        )),
        Some(format!("http://{prom}/")),
    );
    let step = |n: &str| plan.steps.iter().find(|s| s.step.name == n).unwrap();

    let out = exec.execute(&plan, step("hello")).await;
    assert_eq!(out.status, StepStatus::Succeeded, "{out:?}");
    assert_eq!(out.output, "world\n");
    assert_eq!(out.exit_code, Some(0));

    let out = exec.execute(&plan, step("slow")).await;
    assert_eq!(out.status, StepStatus::TimedOut, "{out:?}");

    let out = exec.execute(&plan, step("fails")).await;
    assert_eq!(out.status, StepStatus::Failed);
    assert!(
        out.output.contains("--- stderr ---\nls: "),
        "{}",
        out.output
    );

    // Bot command steps go to the bot's own runner, not to the agent.
    let out = exec.execute(&plan, step("on-bot")).await;
    assert_eq!(out.status, StepStatus::Succeeded);
    assert_eq!(bot_runner.calls().len(), 1);
    assert_eq!(bot_runner.calls()[0].argv, ["echo", "bot"]);

    let out = exec.execute(&plan, step("q")).await;
    assert_eq!(out.status, StepStatus::Succeeded, "{out:?}");
    assert_eq!(
        out.output,
        format!("up{{instance=\"up{{instance=\\\"{agent}\\\"}}\"}} 1\n")
    );

    // A wrong shared secret: the agent refuses, the outcome says so.
    let bad = Executor::new(
        bot_runner.clone(),
        NodeSteps::Agent(AgentClient::new("http://{instance}", Secret::new("wrong"))),
        None,
    );
    let out = bad.execute(&plan, step("hello")).await;
    assert_eq!(out.status, StepStatus::Error);
    assert!(out.output.contains("refused: HTTP 401"), "{}", out.output);

    // No Prometheus URL: promql steps are skipped with a note.
    let out = bad.execute(&plan, step("q")).await;
    assert_eq!(out.status, StepStatus::Skipped);
}
