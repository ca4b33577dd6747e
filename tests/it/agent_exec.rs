//! The agent's `POST /v1/exec`: Ed25519 signatures bound to one node
//! (valid, stale, replayed, other key, other node, unsigned), the argv
//! digest and the approval a mitigation must carry, lookups (404/400), and
//! the step timeout and output cap enforced on real processes. Then the bot
//! side end to end: the engine's AgentClient signs a node step for the node
//! its inventory names, a real agent router runs it. And a `releases_gpu`
//! step on an agent with the fake GPU backend: NVML released and the GPU
//! collector paused while it runs (scrapes answer at once, no GPU series,
//! `gpuops_gpu_released 1`), initialised again afterwards, whatever the
//! step came to. And `POST /v1/plan`: signed for planning only (each
//! endpoint refuses the other's requests), the argv resolved on the node,
//! sudo's refusal, the GPU's other NVML holders, and an exec refused when
//! the binary moved since the plan.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt as _;
use tower::ServiceExt as _;

use gpuops::collector::{self, Context, KernelEvents, Runner};
use gpuops::config::agent::{ExecConfig, GpuBackendChoice};
use gpuops::config::AgentConfig;
use gpuops::exec_auth::{ExecSigner, ExecVerifier, SignedApproval, SignedExec};
use gpuops::exporter::{self, AgentState};
use gpuops::gpu::GpuGate;
use gpuops::inventory::Inventory;
use gpuops::runbook::agent_exec::{self, ExecState};
use gpuops::runbook::engine::{
    self, AgentAddr, AgentClient, Executor, NodeSteps, StepExecutor as _, StepStatus,
};
use gpuops::runbook::exec::resolve::{resolve_argv, SearchPath};
use gpuops::runbook::exec::{
    CommandOutput, CommandRunner, CommandSpec, ProcessRunner, RecordingRunner, RunError,
    TRUNCATION_MARKER,
};
use gpuops::signing::{FixedClock, SystemClock};
use gpuops::telemetry::HttpMetrics;

const NOW: i64 = 1_800_000_000;
const CAP: usize = 1024;
const NODE: &str = "node-a";

const RUNBOOK: &str = r#"
id: node-test
title: Node test
params:
  word: { pattern: '[a-z]{1,10}', default: hello }
  instance: { pattern: '[A-Za-z0-9.:_-]{1,255}', from_label: instance, default: none }
  node: { pattern: '[A-Za-z0-9-]{1,63}', from_label: node, default: none }
steps:
  - { name: hello, phase: investigate, kind: command, target: node, timeout: 5s, run: [echo, "{{word}}"] }
  - { name: slow, phase: investigate, kind: command, target: node, timeout: 1s, run: [sleep, "30"] }
  - { name: flood, phase: investigate, kind: command, target: node, timeout: 20s, run: [seq, "1", "1000000"] }
  - { name: fails, phase: investigate, kind: command, target: node, timeout: 5s, run: [ls, /gpuops-no-such-dir] }
  - { name: on-bot, phase: investigate, kind: command, target: bot, run: [echo, bot] }
  - { name: q, phase: investigate, kind: promql, query: 'up{instance="{{instance}}"}' }
  - { name: drain, phase: mitigate, kind: command, target: node, timeout: 5s, needs_approval: true, run: [echo, "drained {{node}}"] }
  - { name: slurm-only, phase: investigate, kind: command, target: node, only_if_exists: /nonexistent/gpuops-test/scontrol, run: [echo, slurm] }
  - { name: root-only, phase: investigate, kind: command, target: node, only_if_exists: /, run: [echo, root] }
  - { name: gpu-reset, phase: investigate, kind: command, target: node, timeout: 5s, releases_gpu: true, run: [nvidia-smi, -r] }
"#;

fn runbook_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("node-test.yaml"), RUNBOOK).unwrap();
    std::fs::write(dir.path().join("broken.yaml"), "id: broken\n").unwrap();
    dir
}

fn bot_key() -> &'static ExecSigner {
    static KEY: std::sync::OnceLock<ExecSigner> = std::sync::OnceLock::new();
    KEY.get_or_init(ExecSigner::generate)
}

/// A directory of fake binaries (`nvidia-smi`: this machine has no GPU),
/// searched first.
fn fake_bins() -> &'static Path {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| crate::support::fake_bins(&["nvidia-smi"]))
        .path()
}

/// The agents' search path in these tests.
fn test_path() -> SearchPath {
    SearchPath::first_then_default(&[fake_bins().to_path_buf()])
}

fn router_for(dir: &Path, node: &str, clock: Arc<FixedClock>) -> axum::Router {
    let state = ExecState::new(
        ExecVerifier::with_clock(vec![bot_key().public_key()], node, clock),
        dir.to_path_buf(),
        CAP,
        Arc::new(ProcessRunner),
    )
    .with_search_path(test_path());
    agent_exec::router_with(Arc::new(state))
}

fn router(dir: &Path, clock: Arc<FixedClock>) -> axum::Router {
    router_for(dir, NODE, clock)
}

/// The exec request the bot would sign for `step` with `params`.
fn exec_req(node: &str, step: &str, params: &[(&str, &str)], ts: i64) -> SignedExec {
    let rb = gpuops::runbook::parse_runbook(Path::new("node-test.yaml"), RUNBOOK).unwrap();
    let given: BTreeMap<String, String> = params
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let argv = match engine::plan(&rb, &given, &BTreeMap::new()) {
        Ok(plan) => match plan.step(step).map(|s| &s.rendered) {
            Some(engine::Rendered::Command { argv }) => argv.clone(),
            _ => vec![],
        },
        Err(_) => vec![],
    };
    // The agent resolves names on its search path: the bot signs that argv.
    let argv = resolve_argv(&argv, &test_path()).unwrap_or(argv);
    ExecSigner::request(node, "node-test", step, given, &argv, None, ts)
}

fn signed_req(req: &SignedExec, key: &ExecSigner) -> Request<Body> {
    let (body, headers) = key.sign(req);
    raw(body, &headers)
}

fn raw(body: Vec<u8>, headers: &[(&'static str, String)]) -> Request<Body> {
    let mut b = Request::post("/v1/exec").header("content-type", "application/json");
    for (k, v) in headers {
        b = b.header(*k, v);
    }
    b.body(Body::from(body)).unwrap()
}

fn signed(step: &str, params: &[(&str, &str)], ts: i64) -> Request<Body> {
    signed_req(&exec_req(NODE, step, params, ts), bot_key())
}

async fn send(app: &axum::Router, req: Request<Body>) -> (StatusCode, serde_json::Value) {
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&bytes).into()));
    (status, json)
}

#[tokio::test]
async fn signatures_unsigned_stale_replayed_mis_signed_get_401() {
    let dir = runbook_dir();
    let app = router(dir.path(), Arc::new(FixedClock::new(NOW)));

    let unsigned = Request::post("/v1/exec")
        .body(Body::from(
            serde_json::to_vec(&exec_req(NODE, "hello", &[], NOW)).unwrap(),
        ))
        .unwrap();
    assert_eq!(send(&app, unsigned).await.0, StatusCode::UNAUTHORIZED);

    assert_eq!(
        send(&app, signed("hello", &[], NOW - 301)).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        send(&app, signed("hello", &[], NOW + 301)).await.0,
        StatusCode::UNAUTHORIZED
    );

    // Signed by another key (an agent has none that the others accept).
    let other = ExecSigner::generate();
    let wrong_key = signed_req(&exec_req(NODE, "hello", &[], NOW), &other);
    assert_eq!(send(&app, wrong_key).await.0, StatusCode::UNAUTHORIZED);

    // Signed for one body, sent with another.
    let (_, headers) = bot_key().sign(&exec_req(NODE, "hello", &[], NOW));
    let (evil, _) = bot_key().sign(&exec_req(NODE, "hello", &[("word", "evil")], NOW));
    assert_eq!(
        send(&app, raw(evil, &headers)).await.0,
        StatusCode::UNAUTHORIZED
    );

    // Valid once (ahead of the agent's clock by the allowed skew); the very
    // same request again is a replay, in any hex case.
    let (body, headers) = bot_key().sign(&exec_req(
        NODE,
        "hello",
        &[],
        NOW + gpuops::exec_auth::MAX_FUTURE_SKEW_SECS,
    ));
    let (status, json) = send(&app, raw(body.clone(), &headers)).await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(json["stdout"], "hello\n");
    assert_eq!(json["exit_code"], 0);
    assert_eq!(
        send(&app, raw(body.clone(), &headers)).await.0,
        StatusCode::UNAUTHORIZED
    );
    let upper = [
        (headers[0].0, headers[0].1.to_ascii_uppercase()),
        headers[1].clone(),
    ];
    assert_eq!(
        send(&app, raw(body, &upper)).await.0,
        StatusCode::UNAUTHORIZED
    );
}

/// Finding 5 (issue 20): a request signed 120 s ahead was accepted, the
/// agent restarted, and the same bytes were accepted again.
#[tokio::test]
async fn exec_from_the_future_is_refused() {
    let dir = runbook_dir();
    let app = router(dir.path(), Arc::new(FixedClock::new(NOW)));
    let (body, headers) = bot_key().sign(&exec_req(NODE, "hello", &[], NOW + 120));
    let (status, json) = send(&app, raw(body.clone(), &headers)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{json}");
    // The agent restarts 30 s later: the same bytes are still refused.
    let restarted = router(dir.path(), Arc::new(FixedClock::new(NOW + 30)));
    assert_eq!(
        send(&restarted, raw(body, &headers)).await.0,
        StatusCode::UNAUTHORIZED
    );
    // One accepted at the edge of the skew is refused after a restart.
    let (body, headers) = bot_key().sign(&exec_req(
        NODE,
        "hello",
        &[],
        NOW + gpuops::exec_auth::MAX_FUTURE_SKEW_SECS,
    ));
    assert_eq!(
        send(&app, raw(body.clone(), &headers)).await.0,
        StatusCode::OK
    );
    assert_eq!(
        send(&restarted, raw(body, &headers)).await.0,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn exec_request_for_node_a_refused_on_node_b() {
    // Finding 1: a request captured for agent A ran on agent B (same fleet
    // secret). Now the signed content names the node and B refuses it.
    let dir = runbook_dir();
    let clock = Arc::new(FixedClock::new(NOW));
    let runner = Arc::new(RecordingRunner::new());
    let b = agent_exec::router_with(Arc::new(
        ExecState::new(
            ExecVerifier::with_clock(vec![bot_key().public_key()], "node-b", clock.clone()),
            dir.path().to_path_buf(),
            CAP,
            runner.clone(),
        )
        .with_search_path(test_path()),
    ));
    let a = router_for(dir.path(), "node-a", clock);
    let (body, headers) = bot_key().sign(&exec_req("node-a", "hello", &[], NOW));
    let (status, json) = send(&b, raw(body.clone(), &headers)).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{json}");
    assert!(
        json["error"]
            .as_str()
            .unwrap()
            .contains("for node \"node-a\""),
        "{json}"
    );
    assert!(runner.calls().is_empty(), "node-b ran {:?}", runner.calls());
    // Rewriting the node breaks the signature.
    let forged = String::from_utf8(body.clone())
        .unwrap()
        .replace("\"node-a\"", "\"node-b\"");
    assert_eq!(
        send(&b, raw(forged.into_bytes(), &headers)).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert!(runner.calls().is_empty());
    // It still runs, once, where it was meant to.
    assert_eq!(send(&a, raw(body, &headers)).await.0, StatusCode::OK);
}

#[tokio::test]
async fn exec_argv_digest_mismatch_is_refused() {
    // The bot rendered another command than this node's runbook file gives.
    let dir = runbook_dir();
    let app = router(dir.path(), Arc::new(FixedClock::new(NOW)));
    let mut req = exec_req(NODE, "hello", &[], NOW);
    req.argv_sha256 = gpuops::exec_auth::argv_digest(&["sudo".into(), "reboot".into()]);
    let (status, json) = send(&app, signed_req(&req, bot_key())).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{json}");
    assert!(
        json["error"]
            .as_str()
            .unwrap()
            .contains("differs from what this node runs now"),
        "{json}"
    );
}

#[tokio::test]
async fn exec_mitigation_without_signed_approval_is_refused() {
    // The agent itself checks that an approval-gated step carries one.
    let dir = runbook_dir();
    let app = router(dir.path(), Arc::new(FixedClock::new(NOW)));
    let req = exec_req(NODE, "drain", &[("node", NODE)], NOW);
    let (status, json) = send(&app, signed_req(&req, bot_key())).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{json}");
    assert!(
        json["error"].as_str().unwrap().contains("needs approval"),
        "{json}"
    );
    let mut req = exec_req(NODE, "drain", &[("node", NODE)], NOW);
    req.approval = Some(SignedApproval {
        run: "r0001".into(),
        step: "drain".into(),
        requested_by: "slack:U1".into(),
        approved_by: "slack:U2".into(),
        approved_at: NOW,
    });
    let (status, json) = send(&app, signed_req(&req, bot_key())).await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(json["stdout"], "drained node-a\n");
}

#[tokio::test]
async fn exec_node_parameter_naming_another_node_is_refused() {
    let dir = runbook_dir();
    let app = router(dir.path(), Arc::new(FixedClock::new(NOW)));
    let mut req = exec_req(NODE, "drain", &[("node", "node-b")], NOW);
    req.approval = Some(SignedApproval {
        run: "r0001".into(),
        step: "drain".into(),
        requested_by: "slack:U1".into(),
        approved_by: "slack:U2".into(),
        approved_at: NOW,
    });
    let (status, json) = send(&app, signed_req(&req, bot_key())).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{json}");
    assert!(
        json["error"]
            .as_str()
            .unwrap()
            .contains("names another node"),
        "{json}"
    );
}

#[tokio::test]
async fn lookups_and_validation() {
    let dir = runbook_dir();
    let app = router(dir.path(), Arc::new(FixedClock::new(NOW)));
    let check = |body: Vec<u8>, status: StatusCode, error_contains: &'static str| {
        let app = app.clone();
        async move {
            let headers = bot_key().sign_bytes(&body);
            let (got, json) = send(&app, raw(body.clone(), &headers)).await;
            let body = String::from_utf8_lossy(&body[..body.len().min(200)]).to_string();
            assert_eq!(got, status, "{body}: {json}");
            let err = json["error"].as_str().unwrap_or("");
            assert!(err.contains(error_contains), "{body}: {json}");
        }
    };
    let with = |f: &dyn Fn(&mut SignedExec)| {
        let mut r = exec_req(NODE, "hello", &[], NOW);
        f(&mut r);
        serde_json::to_vec(&r).unwrap()
    };
    check(
        with(&|r| r.runbook = "nope".into()),
        StatusCode::NOT_FOUND,
        "no runbook nope on this node",
    )
    .await;
    check(
        with(&|r| r.runbook = "../../etc/passwd".into()),
        StatusCode::NOT_FOUND,
        "no such runbook",
    )
    .await;
    check(
        with(&|r| r.step = "nope".into()),
        StatusCode::NOT_FOUND,
        "has no step nope",
    )
    .await;
    check(
        with(&|r| r.step = "on-bot".into()),
        StatusCode::BAD_REQUEST,
        "the agent runs only node commands",
    )
    .await;
    check(
        with(&|r| r.step = "q".into()),
        StatusCode::BAD_REQUEST,
        "the agent runs only node commands",
    )
    .await;
    check(
        with(&|r| {
            r.params.insert("word".into(), "$(reboot)".into());
        }),
        StatusCode::BAD_REQUEST,
        "parameter word: \"$(reboot)\" does not match pattern [a-z]{1,10}",
    )
    .await;
    check(
        with(&|r| {
            r.params.insert("extra".into(), "x".into());
        }),
        StatusCode::BAD_REQUEST,
        "runbook node-test has no such parameter",
    )
    .await;
    let mut v: serde_json::Value = serde_json::from_slice(&with(&|_| {})).unwrap();
    v["argv"] = serde_json::json!(["sh"]);
    check(
        serde_json::to_vec(&v).unwrap(),
        StatusCode::BAD_REQUEST,
        "unknown field",
    )
    .await;
    check(
        b"not json".to_vec(),
        StatusCode::BAD_REQUEST,
        "not an exec request",
    )
    .await;
    check(
        with(&|r| {
            r.runbook = "broken".into();
            r.step = "x".into();
        }),
        StatusCode::INTERNAL_SERVER_ERROR,
        "runbook broken on this node is invalid",
    )
    .await;
    let huge = with(&|r| {
        r.params.insert("word".into(), "a".repeat(70_000));
    });
    check(huge, StatusCode::PAYLOAD_TOO_LARGE, "body larger than").await;
}

#[tokio::test]
async fn step_timeout_and_output_cap_are_enforced() {
    let dir = runbook_dir();
    let app = router(dir.path(), Arc::new(FixedClock::new(NOW)));

    let started = std::time::Instant::now();
    let (status, json) = send(&app, signed("slow", &[], NOW)).await;
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

    let (status, json) = send(&app, signed("flood", &[], NOW)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json["truncated"], true);
    assert_eq!(json["exit_code"], 0);
    let stdout = json["stdout"].as_str().unwrap();
    assert_eq!(stdout.len(), CAP + TRUNCATION_MARKER.len());
    assert!(stdout.starts_with("1\n2\n3\n") && stdout.ends_with(TRUNCATION_MARKER));

    let (_, json) = send(&app, signed("fails", &[], NOW)).await;
    assert_eq!(json["exit_code"], 2, "{json}");
    assert!(
        json["stderr"].as_str().unwrap().contains("No such file"),
        "{json}"
    );
}

#[test]
fn exec_is_off_without_a_public_key() {
    let cfg = ExecConfig {
        public_keys: vec![],
        public_key_files: vec![],
        runbooks_dir: "/nonexistent".into(),
        output_cap_bytes: CAP,
        path: vec![],
        procfs: "/proc".into(),
    };
    assert!(agent_exec::router(&cfg, NODE, Default::default()).is_none());
    let cfg = ExecConfig {
        public_keys: vec![bot_key().public_key()],
        ..cfg
    };
    assert!(agent_exec::router(&cfg, NODE, Default::default()).is_some());
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
        ExecVerifier::with_clock(vec![bot_key().public_key()], NODE, SystemClock),
        dir.path().to_path_buf(),
        CAP,
        Arc::new(ProcessRunner),
    )
    .with_search_path(test_path());
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
        ("node".to_string(), NODE.to_string()),
    ]
    .into_iter()
    .collect();
    let given = [("word".to_string(), "world".to_string())]
        .into_iter()
        .collect();
    let plan = engine::plan(&rb, &given, &labels).unwrap();
    let bot_runner = Arc::new(RecordingRunner::new());
    let inventory = Arc::new(Inventory::fixed(vec![AgentAddr {
        instance: agent.to_string(),
        node: NODE.into(),
        url: format!("http://{agent}"),
    }]));
    let signer = Arc::new(ExecSigner::from_pem(bot_key().private_pem().unwrap().expose()).unwrap());
    let exec = Executor::new(
        bot_runner.clone(),
        NodeSteps::Agent(AgentClient::new(inventory.clone(), signer)),
        Some(format!("http://{prom}/")),
    );
    let step = |n: &str| plan.steps.iter().find(|s| s.step.name == n).unwrap();

    let out = exec.execute(&plan, step("hello")).await;
    assert_eq!(out.status, StepStatus::Succeeded, "{out:?}");
    assert_eq!(out.output, "world\n");
    assert_eq!(out.exit_code, Some(0));

    // `only_if_exists` is checked by the agent, on the node: the bot's
    // executor asks for the step's plan, the agent says it cannot run, and
    // no exec request is sent.
    let out = exec.execute(&plan, step("slurm-only")).await;
    assert_eq!(out.status, StepStatus::Unavailable, "{out:?}");
    assert_eq!(
        out.output,
        "not run: only_if_exists path /nonexistent/gpuops-test/scontrol missing on node-a"
    );
    let out = exec.execute(&plan, step("root-only")).await;
    assert_eq!(out.status, StepStatus::Succeeded, "{out:?}");
    assert_eq!(out.output, "root\n");

    let out = exec.execute(&plan, step("slow")).await;
    assert_eq!(out.status, StepStatus::TimedOut, "{out:?}");

    let out = exec.execute(&plan, step("fails")).await;
    assert_eq!(out.status, StepStatus::Failed);
    assert!(
        out.output.contains("--- stderr ---\n") && out.output.contains("/ls: cannot access"),
        "{}",
        out.output
    );

    // Bot command steps go to the bot's own runner, not to the agent.
    let out = exec.execute(&plan, step("on-bot")).await;
    assert_eq!(out.status, StepStatus::Succeeded);
    assert_eq!(bot_runner.calls().len(), 1);
    // Resolved on the bot's PATH: the argv it runs names the binary in full.
    let argv = &bot_runner.calls()[0].argv;
    assert!(
        argv[0].starts_with('/') && argv[0].ends_with("/echo"),
        "{argv:?}"
    );
    assert_eq!(argv[1], "bot");

    let out = exec.execute(&plan, step("q")).await;
    assert_eq!(out.status, StepStatus::Succeeded, "{out:?}");
    assert_eq!(
        out.output,
        format!("up{{instance=\"up{{instance=\\\"{agent}\\\"}}\"}} 1\n")
    );

    // A key the agent does not hold: the agent refuses, the outcome says so.
    let bad = Executor::new(
        bot_runner.clone(),
        NodeSteps::Agent(AgentClient::new(
            inventory.clone(),
            Arc::new(ExecSigner::generate()),
        )),
        None,
    );
    let out = bad.execute(&plan, step("hello")).await;
    assert_eq!(out.status, StepStatus::Error);
    assert!(
        out.output.contains("refused the plan: HTTP 401"),
        "{}",
        out.output
    );

    // An instance the inventory does not know: no request leaves the bot.
    let mut elsewhere = plan.clone();
    elsewhere
        .labels
        .insert("instance".into(), "127.0.0.1:1".into());
    let out = exec.execute(&elsewhere, step("hello")).await;
    assert_eq!(out.status, StepStatus::Error);
    assert!(out.output.contains("not a known agent"), "{}", out.output);

    // No Prometheus URL: promql steps are skipped with a note.
    let out = bad.execute(&plan, step("q")).await;
    assert_eq!(out.status, StepStatus::Skipped);
}

/// A runner for `releases_gpu` tests: reports, when a step starts, whether
/// the GPU backend is released at that moment, then waits for the test to
/// say what the step came to.
struct HeldRunner {
    gate: Arc<GpuGate>,
    seen: tokio::sync::mpsc::UnboundedSender<bool>,
    replies:
        tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<Result<CommandOutput, RunError>>>,
}

impl CommandRunner for HeldRunner {
    fn run<'a>(
        &'a self,
        _cmd: &'a CommandSpec,
    ) -> futures_util::future::BoxFuture<'a, Result<CommandOutput, RunError>> {
        Box::pin(async move {
            let released = self.gate.backend().is_some_and(|b| b.is_released());
            let _ = self.seen.send(released);
            match self.replies.lock().await.recv().await {
                Some(r) => r,
                None => Err(RunError::EmptyArgv),
            }
        })
    }
}

/// An agent with the fake GPU backend (8 H100s), its metrics and exec routes.
struct GpuAgent {
    app: axum::Router,
    seen: tokio::sync::mpsc::UnboundedReceiver<bool>,
    reply: tokio::sync::mpsc::UnboundedSender<Result<CommandOutput, RunError>>,
    gate: Arc<GpuGate>,
    _dir: tempfile::TempDir,
}

fn gpu_agent() -> GpuAgent {
    let dir = runbook_dir();
    let mut cfg = AgentConfig::default();
    cfg.collectors.cpu = false;
    cfg.collectors.memory = false;
    cfg.collectors.oom = false;
    cfg.collectors.storage = false;
    cfg.roots.kmsg = dir.path().join("no-kmsg");
    cfg.gpu.backend = GpuBackendChoice::Fake(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpu/h100x8.json"),
    );
    let events = Arc::new(KernelEvents::new());
    let ctx = Arc::new(Context::new(Arc::new(cfg), events.clone(), false));
    let gate = ctx.gpu_gate.clone();
    let collectors = collector::all(&ctx);
    let metrics = exporter::router(Arc::new(AgentState {
        runner: Arc::new(Runner::new(ctx, collectors)),
        events,
        http: Arc::new(HttpMetrics::new()),
    }));
    let (seen_tx, seen) = tokio::sync::mpsc::unbounded_channel();
    let (reply, replies) = tokio::sync::mpsc::unbounded_channel();
    let runner = HeldRunner {
        gate: gate.clone(),
        seen: seen_tx,
        replies: tokio::sync::Mutex::new(replies),
    };
    let exec = ExecState::new(
        ExecVerifier::with_clock(
            vec![bot_key().public_key()],
            NODE,
            Arc::new(FixedClock::new(NOW)),
        ),
        dir.path().to_path_buf(),
        CAP,
        Arc::new(runner),
    )
    .with_search_path(test_path())
    .with_gpu_gate(gate.clone());
    GpuAgent {
        app: metrics.merge(agent_exec::router_with(Arc::new(exec))),
        seen,
        reply,
        gate,
        _dir: dir,
    }
}

/// One scrape: how long it took and the text.
async fn scrape(app: &axum::Router) -> (Duration, String) {
    let started = std::time::Instant::now();
    let req = Request::get("/metrics").body(Body::empty()).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), app.clone().oneshot(req))
        .await
        .expect("a scrape hung")
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        started.elapsed(),
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

fn assert_gpu_values(text: &str) {
    assert!(text.contains("\ngpuops_gpu_released 0\n"), "{text}");
    assert!(
        text.contains("gpuops_collector_success{collector=\"gpu\"} 1"),
        "{text}"
    );
    assert_eq!(text.matches("\ngpu_up{").count(), 8, "{text}");
    assert!(text.contains("\ngpu_utilization_percent{"), "{text}");
}

fn assert_paused(text: &str) {
    assert!(text.contains("\ngpuops_gpu_released 1\n"), "{text}");
    assert!(
        text.contains("gpuops_collector_success{collector=\"gpu\"} 0"),
        "{text}"
    );
    for series in [
        "\ngpu_up{",
        "\ngpu_utilization_percent{",
        "\ngpu_temperature_celsius{",
        "\ngpu_devices ",
    ] {
        assert!(!text.contains(series), "{series:?} while released:\n{text}");
    }
}

fn ok_output() -> Result<CommandOutput, RunError> {
    Ok(CommandOutput {
        exit_code: Some(0),
        ..CommandOutput::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releases_gpu_step_pauses_the_gpu_collector_and_values_come_back() {
    let mut agent = gpu_agent();
    let (_, before) = scrape(&agent.app).await;
    assert_gpu_values(&before);
    let backend = agent
        .gate
        .backend()
        .expect("the collector attached its backend");
    assert!(!backend.is_released());

    let app = agent.app.clone();
    let step = tokio::spawn(async move { send(&app, signed("gpu-reset", &[], NOW)).await });
    let released_during_step = tokio::time::timeout(Duration::from_secs(10), agent.seen.recv())
        .await
        .expect("the step did not start")
        .unwrap();
    assert!(
        released_during_step,
        "NVML must be released before the step runs"
    );
    assert_eq!(
        agent.gate.released_for().as_deref(),
        Some("node-test:gpu-reset")
    );

    // Scrapes during the step: quick, paused, no GPU values; concurrent ones too.
    let (took, during) = scrape(&agent.app).await;
    assert_paused(&during);
    assert!(took < Duration::from_secs(1), "scrape took {took:?}");
    let scrapes: Vec<_> = (0..16)
        .map(|_| {
            let app = agent.app.clone();
            tokio::spawn(async move { scrape(&app).await })
        })
        .collect();
    let mut slowest = Duration::ZERO;
    for s in scrapes {
        let (took, text) = s.await.unwrap();
        assert_paused(&text);
        slowest = slowest.max(took);
    }
    assert!(
        slowest < Duration::from_secs(2),
        "slowest concurrent scrape {slowest:?}"
    );
    println!("scrape while released: {took:?}; slowest of 16 concurrent: {slowest:?}");

    // A second GPU-releasing step while this one runs is refused.
    let (status, json) = send(&agent.app, signed("gpu-reset", &[], NOW + 1)).await;
    assert_eq!(status, StatusCode::CONFLICT, "{json}");
    assert!(
        json["error"].as_str().unwrap().contains("already released"),
        "{json}"
    );

    agent.reply.send(ok_output()).unwrap();
    let (status, json) = step.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(json["exit_code"], 0, "{json}");
    assert!(
        !backend.is_released(),
        "NVML initialised again after the step"
    );
    assert_eq!(agent.gate.released_for(), None);
    let (_, after) = scrape(&agent.app).await;
    assert_gpu_values(&after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releases_gpu_step_that_fails_or_times_out_still_reinitialises() {
    let mut agent = gpu_agent();
    let backend = agent.gate.backend().unwrap();
    let outcomes = [
        Ok(CommandOutput {
            exit_code: None,
            timed_out: true,
            ..CommandOutput::default()
        }),
        Ok(CommandOutput {
            exit_code: Some(1),
            stderr: "Unable to reset this GPU because it's being used by some other process".into(),
            ..CommandOutput::default()
        }),
        Err(RunError::Spawn {
            program: "nvidia-smi".into(),
            message: "No such file or directory".into(),
        }),
    ];
    for (i, outcome) in outcomes.into_iter().enumerate() {
        let app = agent.app.clone();
        let ts = NOW + i as i64;
        let step = tokio::spawn(async move { send(&app, signed("gpu-reset", &[], ts)).await });
        assert!(agent.seen.recv().await.unwrap(), "released for step {i}");
        assert_paused(&scrape(&agent.app).await.1);
        agent.reply.send(outcome).unwrap();
        let (status, json) = step.await.unwrap();
        assert_eq!(status, StatusCode::OK, "{json}");
        assert!(
            !backend.is_released(),
            "step {i}: NVML not initialised again"
        );
        assert_gpu_values(&scrape(&agent.app).await.1);
    }
    // A request that goes away mid-step (the bot's connection dropped)
    // re-initialises too.
    let app = agent.app.clone();
    let step = tokio::spawn(async move { send(&app, signed("gpu-reset", &[], NOW + 3)).await });
    assert!(agent.seen.recv().await.unwrap());
    step.abort();
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while backend.is_released() || agent.gate.released_for().is_some() {
        assert!(
            std::time::Instant::now() < until,
            "not re-initialised after the request went away"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_gpu_values(&scrape(&agent.app).await.1);
}

// Plans before approvals (issue 22): `POST /v1/plan` answers what a step
// would run on this node, signed for planning only, read-only.

const PLAN_RUNBOOK: &str = r#"
id: plan-test
title: Plan test
params:
  node: { pattern: '[A-Za-z0-9-]{1,63}', default: node-a }
steps:
  - { name: drain-slurm, phase: investigate, kind: command, target: node, run: [sudo, -n, scontrol, update, "nodename={{node}}", state=drain] }
  - { name: reset, phase: investigate, kind: command, target: node, releases_gpu: true, run: [nvidia-smi, -r, -i, "0"] }
  - { name: missing, phase: investigate, kind: command, target: node, run: [gpuops-no-such-binary, x] }
  - { name: moved, phase: investigate, kind: command, target: node, run: [gpuops-moving, x] }
"#;

/// A fake executable `name` in `dir` running `body` (a shell script).
fn fake_bin(dir: &Path, name: &str, body: &str) -> String {
    let p = dir.join(name);
    crate::support::executable(&p, &format!("#!/bin/sh\n{body}\n"));
    p.display().to_string()
}

/// An agent serving `plan-test` with `bins` searched first; `procfs` for holders.
fn plan_agent(
    runbooks: &Path,
    bins: &[&Path],
    procfs: &Path,
    runner: Arc<dyn CommandRunner>,
) -> axum::Router {
    std::fs::write(runbooks.join("plan-test.yaml"), PLAN_RUNBOOK).unwrap();
    let dirs: Vec<std::path::PathBuf> = bins.iter().map(|p| p.to_path_buf()).collect();
    let state = ExecState::new(
        ExecVerifier::with_clock(
            vec![bot_key().public_key()],
            NODE,
            Arc::new(FixedClock::new(NOW)),
        ),
        runbooks.to_path_buf(),
        CAP,
        runner,
    )
    .with_search_path(SearchPath::first_then_default(&dirs))
    .with_procfs(procfs.to_path_buf());
    agent_exec::router_with(Arc::new(state))
}

fn plan_req(step: &str, ts: i64) -> Request<Body> {
    let req = ExecSigner::plan_request(NODE, "plan-test", step, BTreeMap::new(), ts);
    let (body, headers) = bot_key().sign(&req);
    let mut b = Request::post("/v1/plan").header("content-type", "application/json");
    for (k, v) in headers {
        b = b.header(k, v);
    }
    b.body(Body::from(body)).unwrap()
}

#[tokio::test]
async fn plan_signed_request_is_refused_by_exec() {
    let dir = runbook_dir();
    let bins = tempfile::tempdir().unwrap();
    fake_bin(bins.path(), "gpuops-moving", "echo moved");
    let runner = Arc::new(RecordingRunner::new());
    let app = plan_agent(dir.path(), &[bins.path()], dir.path(), runner.clone());
    // A captured plan request, replayed against /v1/exec with the argv the
    // plan answered: the signature allows planning, never running.
    let mut req = ExecSigner::plan_request(NODE, "plan-test", "moved", BTreeMap::new(), NOW);
    req.argv_sha256 = gpuops::exec_auth::argv_digest(&[
        bins.path().join("gpuops-moving").display().to_string(),
        "x".into(),
    ]);
    let (status, json) = send(&app, signed_req(&req, bot_key())).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{json}");
    assert_eq!(
        json["error"], "the request is signed for plan, not for exec",
        "{json}"
    );
    assert!(runner.calls().is_empty(), "ran {:?}", runner.calls());
}

#[tokio::test]
async fn exec_signed_request_is_refused_by_plan() {
    let dir = runbook_dir();
    let runner = Arc::new(RecordingRunner::new());
    let app = plan_agent(dir.path(), &[], dir.path(), runner.clone());
    let (body, headers) = bot_key().sign(&exec_req(NODE, "hello", &[], NOW));
    let mut b = Request::post("/v1/plan").header("content-type", "application/json");
    for (k, v) in &headers {
        b = b.header(*k, v);
    }
    let (status, json) = send(&app, b.body(Body::from(body)).unwrap()).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{json}");
    assert_eq!(
        json["error"], "the request is signed for exec, not for plan",
        "{json}"
    );
    // A plan request for the same step is answered, and runs nothing.
    let (status, json) = send(&app, plan_req("missing", NOW)).await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(json["available"], false, "{json}");
    let reason = json["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("gpuops-no-such-binary not found on node-a's PATH (")
            && reason.contains(":/usr/bin:")
            && reason.ends_with(":/opt/slurm/bin)"),
        "{reason}"
    );
    assert!(runner.calls().is_empty(), "ran {:?}", runner.calls());
}

#[tokio::test]
async fn exec_refuses_argv_that_differs_from_the_plan() {
    let dir = runbook_dir();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let planned_bin = fake_bin(a.path(), "gpuops-moving", "echo moved");
    let runner = Arc::new(RecordingRunner::new());
    let app = plan_agent(
        dir.path(),
        &[a.path(), b.path()],
        dir.path(),
        runner.clone(),
    );
    let (status, plan) = send(&app, plan_req("moved", NOW)).await;
    assert_eq!(status, StatusCode::OK, "{plan}");
    assert_eq!(plan["available"], true, "{plan}");
    assert_eq!(plan["argv"], serde_json::json!([planned_bin, "x"]));
    // The binary moves after the plan: the planned argv no longer runs here.
    std::fs::remove_file(&planned_bin).unwrap();
    let now_bin = fake_bin(b.path(), "gpuops-moving", "echo moved");
    let planned: Vec<String> = serde_json::from_value(plan["argv"].clone()).unwrap();
    let req = ExecSigner::request(
        NODE,
        "plan-test",
        "moved",
        BTreeMap::new(),
        &planned,
        None,
        NOW,
    );
    let (status, json) = send(&app, signed_req(&req, bot_key())).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{json}");
    let error = json["error"].as_str().unwrap();
    assert!(
        error.contains(&gpuops::exec_auth::argv_digest(&planned))
            && error.contains(&format!("{now_bin} x")),
        "{error}"
    );
    assert!(runner.calls().is_empty(), "ran {:?}", runner.calls());
    // Signed with what the node resolves now, it runs that argv.
    let req = ExecSigner::request(
        NODE,
        "plan-test",
        "moved",
        BTreeMap::new(),
        &[now_bin.clone(), "x".into()],
        None,
        NOW,
    );
    let (status, json) = send(&app, signed_req(&req, bot_key())).await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(runner.calls()[0].argv, [now_bin, "x".to_string()]);
}

#[tokio::test]
async fn sudo_refusal_is_reported_by_the_plan() {
    let dir = runbook_dir();
    let bins = tempfile::tempdir().unwrap();
    let sudo = fake_bin(
        bins.path(),
        "sudo",
        r#"for a in "$@"; do if [ "$a" = -l ]; then echo "sudo: a password is required" >&2; exit 1; fi; done; exit 0"#,
    );
    let scontrol = fake_bin(bins.path(), "scontrol", "exit 0");
    let app = plan_agent(
        dir.path(),
        &[bins.path()],
        dir.path(),
        Arc::new(ProcessRunner),
    );
    let (status, json) = send(&app, plan_req("drain-slurm", NOW)).await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(json["available"], false, "{json}");
    assert_eq!(
        json["reason"], "sudo refuses: sudo: a password is required",
        "{json}"
    );
    assert_eq!(
        json["argv"],
        serde_json::json!([
            sudo,
            "-n",
            scontrol,
            "update",
            "nodename=node-a",
            "state=drain"
        ])
    );
    // A sudo that allows it: available, and the plan ran only `sudo -n -l`.
    let runner = Arc::new(RecordingRunner::new());
    let app = plan_agent(dir.path(), &[bins.path()], dir.path(), runner.clone());
    let (_, json) = send(&app, plan_req("drain-slurm", NOW + 1)).await;
    assert_eq!(json["available"], true, "{json}");
    assert_eq!(json["sudo"], "allowed", "{json}");
    let calls = runner.calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(
        calls[0].argv,
        [
            &sudo,
            "-n",
            "-l",
            &scontrol,
            "update",
            "nodename=node-a",
            "state=drain"
        ]
    );
}

#[tokio::test]
async fn plan_lists_nvml_holders_for_a_releases_gpu_step() {
    let dir = runbook_dir();
    let procfs = tempfile::tempdir().unwrap();
    for (pid, comm) in [
        ("812", "nvidia-persiste"), // comm holds 15 bytes of nvidia-persistenced
        ("990", "nv-hostengine"),
        ("1000", "bash"),
        ("self", "gpuops"),
    ] {
        std::fs::create_dir_all(procfs.path().join(pid)).unwrap();
        std::fs::write(procfs.path().join(pid).join("comm"), format!("{comm}\n")).unwrap();
    }
    let runner = Arc::new(RecordingRunner::new());
    let app = plan_agent(dir.path(), &[fake_bins()], procfs.path(), runner.clone());
    let (status, json) = send(&app, plan_req("reset", NOW)).await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(json["available"], true, "{json}");
    assert_eq!(
        json["holders"],
        serde_json::json!([
            {"process": "nvidia-persistenced", "pid": 812},
            {"process": "nv-hostengine", "pid": 990}
        ])
    );
    let plan: engine::StepPlan = serde_json::from_value(json).unwrap();
    assert_eq!(
        plan.holders_text().unwrap(),
        "also holding the GPU: nvidia-persistenced (pid 812), nv-hostengine (pid 990)"
    );
    assert!(runner.calls().is_empty(), "ran {:?}", runner.calls());
}

/// An agent older than plans (no `/v1/plan`: 404): the step is an error
/// naming the version mismatch, and no exec request is ever sent.
#[tokio::test]
async fn agent_without_plan_is_an_error_and_runs_nothing() {
    let execs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = execs.clone();
    let old_agent = serve(axum::Router::new().route(
        "/v1/exec",
        axum::routing::post(move || {
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async { "{}" }
        }),
    ))
    .await;
    let rb = gpuops::runbook::parse_runbook(Path::new("node-test.yaml"), RUNBOOK).unwrap();
    let labels: BTreeMap<String, String> = [
        ("instance".to_string(), old_agent.to_string()),
        ("node".to_string(), NODE.to_string()),
    ]
    .into_iter()
    .collect();
    let plan = engine::plan(&rb, &BTreeMap::new(), &labels).unwrap();
    let inventory = Arc::new(Inventory::fixed(vec![AgentAddr {
        instance: old_agent.to_string(),
        node: NODE.into(),
        url: format!("http://{old_agent}"),
    }]));
    let exec = Executor::new(
        Arc::new(RecordingRunner::new()),
        NodeSteps::Agent(AgentClient::new(
            inventory,
            Arc::new(ExecSigner::generate()),
        )),
        None,
    );
    let hello = plan.step("hello").unwrap();
    let p = exec.plan(&plan, hello).await;
    assert!(p.failed && !p.available, "{p:?}");
    let out = exec.execute(&plan, hello).await;
    assert_eq!(out.status, StepStatus::Error, "{out:?}");
    assert!(
        out.output
            .contains("does not know POST /v1/plan (an older gpuops agent than this bot)"),
        "{}",
        out.output
    );
    assert_eq!(execs.load(std::sync::atomic::Ordering::SeqCst), 0);
}
