//! The real `gpuops agent` binary with `/v1/exec` enabled: a signed request
//! from the engine's AgentClient runs a shipped runbook step; unsigned and
//! replayed requests get 401; without a secret the route does not exist; the
//! log names the step and never the secret.
// Integration tests run the real binary; only the product is held to the
// no-spawn-outside-exec.rs rule.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::io::Read as _;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gpuops::config::Secret;
use gpuops::runbook::engine::{
    self, AgentClient, Executor, NodeSteps, StepExecutor as _, StepStatus,
};
use gpuops::runbook::exec::RecordingRunner;
use gpuops::runbook::RunbookSet;
use gpuops::signing::{self, Clock as _};

const SECRET: &str = "binary-test-secret-6c0ffee";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Agent {
    child: Child,
    addr: String,
}

impl Agent {
    fn start(secret: Option<&str>) -> Agent {
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_gpuops"));
        cmd.args(["agent", "--listen", &addr, "--runbooks", "runbooks"])
            .env_remove("GPUOPS_EXEC_SECRET")
            .env_remove("GPUOPS_AGENT_CONFIG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(s) = secret {
            cmd.env("GPUOPS_EXEC_SECRET", s);
        }
        let child = cmd.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(Instant::now() < deadline, "agent did not listen on {addr}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Agent { child, addr }
    }

    /// Stops the agent and returns its log.
    fn stop(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut log = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut log);
        }
        log
    }
}

#[tokio::test]
async fn signed_exec_runs_a_shipped_step_and_forgeries_get_401() {
    let agent = Agent::start(Some(SECRET));
    let http = reqwest::Client::new();
    let url = format!("http://{}/v1/exec", agent.addr);
    let body = r#"{"runbook":"storage","step":"mount-table","params":{"mountpoint":"/","instance":"n1:9949","node":"n1","device":"none","alertname":"manual"}}"#;

    let unsigned = http.post(&url).body(body).send().await.unwrap();
    assert_eq!(unsigned.status(), 401);

    let now = signing::SystemClock.now_unix();
    let headers = signing::exec_headers(SECRET.as_bytes(), now, body.as_bytes());
    let send = |headers: &[(&'static str, String); 3]| {
        let mut req = http.post(&url).body(body);
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        req.send()
    };
    let first = send(&headers).await.unwrap();
    assert_eq!(first.status(), 200);
    let json: serde_json::Value = first.json().await.unwrap();
    assert_eq!(json["exit_code"], 0, "{json}");
    // /proc/self/mountinfo: optional fields end with " - ".
    assert!(json["stdout"].as_str().unwrap().contains(" - "), "{json}");
    let replay = send(&headers).await.unwrap();
    assert_eq!(replay.status(), 401);
    let forged = signing::exec_headers(b"guessed-secret", now, body.as_bytes());
    assert_eq!(send(&forged).await.unwrap().status(), 401);

    // The bot's side: plan from alert labels, send the node step, read the outcome.
    let (set, errors) = RunbookSet::load_dir(std::path::Path::new("runbooks"));
    assert!(errors.0.is_empty());
    let labels: BTreeMap<String, String> = [
        ("alertname", "StorageReadOnly"),
        ("instance", agent.addr.as_str()),
        ("mountpoint", "/"),
        // The bot adds the node's real name from its agent inventory.
        ("node", "n1"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let rb = set.suggest(&labels)[0];
    assert_eq!(rb.id, "storage");
    let plan = engine::plan(rb, &BTreeMap::new(), &labels).unwrap();
    let exec = Executor::new(
        std::sync::Arc::new(RecordingRunner::new()),
        NodeSteps::Agent(AgentClient::new("http://{instance}", Secret::new(SECRET))),
        None,
    );
    let step = plan
        .steps
        .iter()
        .find(|s| s.step.name == "mount-table")
        .unwrap();
    let out = exec.execute(&plan, step).await;
    assert_eq!(out.status, StepStatus::Succeeded, "{out:?}");
    assert!(out.output.contains(" - "), "{}", out.output);

    let log = agent.stop();
    assert!(log.contains("exec endpoint enabled"), "{log}");
    assert!(log.contains("exec step finished"), "{log}");
    assert!(
        log.contains("runbook=storage") || log.contains("runbook=\"storage\""),
        "{log}"
    );
    assert!(log.contains("exec request refused"), "{log}");
    assert!(
        !log.contains(SECRET),
        "the secret leaked into the log:\n{log}"
    );
}

#[tokio::test]
async fn exec_route_is_absent_without_a_secret() {
    let agent = Agent::start(None);
    let resp = reqwest::Client::new()
        .post(format!("http://{}/v1/exec", agent.addr))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let log = agent.stop();
    assert!(!log.contains("exec endpoint enabled"), "{log}");
}
