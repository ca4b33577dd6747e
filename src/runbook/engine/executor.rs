//! The step executors: [`StepExecutor`] and its real implementation
//! [`Executor`] (local commands through the [`CommandRunner`], node steps
//! signed and sent to the node's agent by [`AgentClient`], PromQL and HTTP
//! steps), the dry-run recorder, and the `/v1/exec` response. Planning and
//! the step-flow rule are in `engine.rs`; this file only runs one step.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};

#[cfg(feature = "bot")]
use crate::exec_auth::ExecSigner;
use crate::runbook::engine::*;
use crate::runbook::exec::resolve::{resolve_argv, SearchPath};
use crate::runbook::exec::{CommandOutput, CommandRunner, CommandSpec, RunError};
use crate::runbook::*;

mod step_plan;
mod text;

pub use step_plan::*;
pub use text::format_promql_response;
use text::{cap_text, read_text_capped};

/// What one step came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepOutcome {
    pub status: StepStatus,
    pub exit_code: Option<i32>,
    /// Stdout, then stderr under a `--- stderr ---` line; or the HTTP body,
    /// the PromQL result, or the reason for a skip or an error.
    pub output: String,
    pub duration: Duration,
    pub truncated: bool,
}

/// Plans and runs one planned step.
pub trait StepExecutor: Send + Sync {
    fn execute<'a>(
        &'a self,
        plan: &'a RunPlan,
        step: &'a PlannedStep,
    ) -> BoxFuture<'a, StepOutcome>;

    /// What `step` would run and whether it can, run nothing ([`StepPlan`]).
    /// The default (test executors) is the rendered argv, available.
    fn plan<'a>(&'a self, _plan: &'a RunPlan, step: &'a PlannedStep) -> BoxFuture<'a, StepPlan> {
        Box::pin(async move { StepPlan::assumed(&step.rendered) })
    }
}

/// Where `target: node` command steps go.
pub enum NodeSteps {
    /// Run here through the command runner (`gpuops runbook run` on the node).
    Local,
    /// Send to the node's agent (the bot).
    #[cfg(feature = "bot")]
    Agent(AgentClient),
    /// Node steps cannot run here; the string says why (shown as the outcome).
    Unavailable(String),
}

/// The real executor.
pub struct Executor {
    pub runner: Arc<dyn CommandRunner>,
    pub node: NodeSteps,
    /// Prometheus base URL for promql steps; `None` skips them.
    pub prometheus_url: Option<String>,
    pub output_cap: usize,
    http: reqwest::Client,
    /// The bot's agent inventory: on the bot (node steps not [`NodeSteps::Local`])
    /// every request naming a node (HTTP steps, bot-side probes such as
    /// `ping {{host}}`) must name one of its nodes; `None` there refuses them.
    directory: Option<Arc<dyn AgentDirectory>>,
    /// Where bot-side (and, for `gpuops runbook run`, local) commands'
    /// binaries are found.
    pub search_path: SearchPath,
}

/// Signs and sends node steps to the agents a directory knows.
#[cfg(feature = "bot")]
pub struct AgentClient {
    directory: Arc<dyn AgentDirectory>,
    signer: Arc<ExecSigner>,
    http: reqwest::Client,
    basic_auth: Option<(String, crate::config::Secret)>,
}

/// The HTTP client for requests to agents: their CA, the bot's client
/// certificate, no redirects.
#[cfg(feature = "bot")]
pub fn agent_http_client(
    t: &crate::config::bot::AgentTransport,
) -> Result<reqwest::Client, String> {
    let mut b = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .redirect(reqwest::redirect::Policy::none());
    if let Some(pem) = &t.ca_pem {
        for c in reqwest::Certificate::from_pem_bundle(pem).map_err(|e| format!("ca_file: {e}"))? {
            b = b.add_root_certificate(c);
        }
    }
    if let Some(pem) = &t.identity_pem {
        let id = reqwest::Identity::from_pem(pem.expose().as_bytes())
            .map_err(|_| "client certificate: not a PEM certificate and key".to_string())?;
        b = b.identity(id);
    }
    b.build()
        .map_err(|e| format!("cannot build the agents' HTTP client: {e}"))
}

/// One agent the bot may send node steps to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentAddr {
    /// The `instance` label alerts carry for it.
    pub instance: String,
    /// The node's real name: `{{node}}`, and the node a request is signed for.
    pub node: String,
    /// Base URL, e.g. `http://10.0.0.17:9949`.
    pub url: String,
}

/// Where agents are: the bot's inventory (the `inventory` module).
pub trait AgentDirectory: Send + Sync {
    /// The agent behind an `instance` label, or why the bot will not talk to it.
    fn agent<'a>(&'a self, instance: &'a str) -> BoxFuture<'a, Result<AgentAddr, String>>;
}

pub use crate::exec_auth::is_hostport;

/// The `/v1/exec` response body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecResponse {
    pub exit_code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub duration_seconds: f64,
    pub timed_out: bool,
    pub truncated: bool,
    /// Set when the command could not be started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Set when the step was not run: its `only_if_exists` path (starting
    /// with `/`) is missing on the node, or the reason its binary cannot
    /// run there (`scontrol not found on gpu-node-17's PATH (…)`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unavailable: Option<String>,
}

impl StepOutcome {
    pub fn skipped(why: impl Into<String>) -> StepOutcome {
        StepOutcome {
            status: StepStatus::Skipped,
            exit_code: None,
            output: why.into(),
            duration: Duration::ZERO,
            truncated: false,
        }
    }

    /// Not run: the plan says it cannot run (`reason`).
    pub fn unavailable_because(reason: &str) -> StepOutcome {
        StepOutcome {
            status: StepStatus::Unavailable,
            exit_code: None,
            output: format!("not run: {reason}"),
            duration: Duration::ZERO,
            truncated: false,
        }
    }

    /// The step's `only_if_exists` path is missing on the machine `where_`.
    pub fn unavailable(path: &str, where_: &str) -> StepOutcome {
        StepOutcome {
            status: StepStatus::Unavailable,
            exit_code: None,
            output: format!("not run: {path} does not exist {where_}"),
            duration: Duration::ZERO,
            truncated: false,
        }
    }

    pub fn error(why: impl Into<String>, duration: Duration) -> StepOutcome {
        StepOutcome {
            status: StepStatus::Error,
            exit_code: None,
            output: why.into(),
            duration,
            truncated: false,
        }
    }

    /// The outcome of a command that ran; `nothing_found` is the step's
    /// `nothing_found_exit`: that status succeeds, saying it found nothing,
    /// unless the command also wrote to stderr (journalctl with no journal,
    /// lsof on a path it cannot stat exit 1 too: they could not look).
    fn from_command(out: CommandOutput, nothing_found: Option<i32>) -> StepOutcome {
        let found_nothing = !out.timed_out
            && out.exit_code.is_some()
            && out.exit_code == nothing_found
            && out.stderr.trim().is_empty();
        let status = if out.timed_out {
            StepStatus::TimedOut
        } else if out.exit_code == Some(0) || found_nothing {
            StepStatus::Succeeded
        } else {
            StepStatus::Failed
        };
        let mut output = out.stdout;
        if found_nothing {
            if !output.is_empty() && !output.ends_with('\n') {
                output.push('\n');
            }
            let _ = writeln!(
                output,
                "(nothing found: exit {})",
                out.exit_code.unwrap_or_default()
            );
        }
        if !out.stderr.is_empty() {
            if !output.is_empty() && !output.ends_with('\n') {
                output.push('\n');
            }
            output.push_str("--- stderr ---\n");
            output.push_str(&out.stderr);
        }
        if out.timed_out {
            let _ = write!(
                output,
                "\n[killed after {}]",
                humantime::format_duration(out.duration)
            );
        }
        StepOutcome {
            status,
            exit_code: out.exit_code,
            output,
            duration: out.duration,
            truncated: out.truncated,
        }
    }
}

impl Executor {
    pub fn new(
        runner: Arc<dyn CommandRunner>,
        node: NodeSteps,
        prometheus_url: Option<String>,
    ) -> Executor {
        let directory = match &node {
            #[cfg(feature = "bot")]
            NodeSteps::Agent(agent) => Some(agent.directory()),
            _ => None,
        };
        Executor {
            runner,
            node,
            prometheus_url: prometheus_url.map(|u| u.trim_end_matches('/').to_string()),
            output_cap: DEFAULT_OUTPUT_CAP,
            http: http_client(),
            directory,
            search_path: SearchPath::default(),
        }
    }

    /// With the directories binaries are resolved on (`[exec] path`).
    pub fn with_search_path(mut self, path: SearchPath) -> Executor {
        self.search_path = path;
        self
    }

    /// The name reasons give the machine a local step runs on.
    fn here_name(&self, step: &Step) -> &'static str {
        match (step.target, &self.node) {
            (StepTarget::Node, NodeSteps::Local) => "this host",
            _ => "the bot",
        }
    }

    /// With the inventory that requests to nodes are checked against (when
    /// node steps cannot run, e.g. no signing key, the inventory may still be known).
    pub fn with_directory(mut self, directory: Option<Arc<dyn AgentDirectory>>) -> Executor {
        if directory.is_some() {
            self.directory = directory;
        }
        self
    }

    /// On the bot, whether `step` may go out: an HTTP step's host must be an
    /// inventory node (its `instance`, or the URL of its agent); a bot-side
    /// command with the run's instance (or its host) as an argument needs
    /// that instance in the inventory. `Err` says why not. Steps on the node
    /// itself (`gpuops runbook run`) are not checked.
    async fn node_request_allowed(&self, plan: &RunPlan, step: &PlannedStep) -> Result<(), String> {
        if matches!(self.node, NodeSteps::Local) {
            return Ok(());
        }
        let instance = plan
            .params
            .get("instance")
            .map(str::to_string)
            .or_else(|| plan.labels.get("instance").cloned());
        match (&step.rendered, step.step.target) {
            (Rendered::Http { url, .. }, _) => {
                let parsed = reqwest::Url::parse(url).map_err(|e| format!("bad URL: {e}"))?;
                let host = parsed.host_str().unwrap_or("");
                let authority = match parsed.port_or_known_default() {
                    Some(p) => format!("{host}:{p}"),
                    None => host.to_string(),
                };
                let Some(dir) = &self.directory else {
                    return Err(format!(
                        "{authority} not contacted: the bot sends requests only to the nodes of its agent inventory ([agents]), and it has none"
                    ));
                };
                if dir.agent(&authority).await.is_ok() {
                    return Ok(());
                }
                if let Some(inst) = &instance {
                    if let Ok(a) = dir.agent(inst).await {
                        let agent_authority = reqwest::Url::parse(&a.url).ok().map(|u| {
                            format!(
                                "{}:{}",
                                u.host_str().unwrap_or(""),
                                u.port_or_known_default().unwrap_or(0)
                            )
                        });
                        if agent_authority.as_deref() == Some(authority.as_str()) {
                            return Ok(());
                        }
                    }
                }
                Err(format!(
                    "{authority} is not a node of the bot's agent inventory: not contacted"
                ))
            }
            (Rendered::Command { argv }, StepTarget::Bot) => {
                let Some(inst) = instance else {
                    return Ok(());
                };
                let host = host_of_instance(&inst);
                if !argv.iter().skip(1).any(|a| *a == inst || a == host) {
                    return Ok(());
                }
                let known = match &self.directory {
                    Some(dir) => dir.agent(&inst).await.is_ok(),
                    None => false,
                };
                if known {
                    Ok(())
                } else {
                    Err(format!(
                        "{inst} is not a node of the bot's agent inventory: not contacted"
                    ))
                }
            }
            _ => Ok(()),
        }
    }

    async fn command(&self, step: &Step, argv: &[String]) -> StepOutcome {
        let spec = CommandSpec {
            argv: argv.to_vec(),
            timeout: step.timeout,
            output_cap: self.output_cap,
        };
        let start = Instant::now();
        match self.runner.run(&spec).await {
            Ok(out) => StepOutcome::from_command(out, step.nothing_found_exit),
            Err(e) => StepOutcome::error(e.to_string(), start.elapsed()),
        }
    }

    async fn http_step(
        &self,
        step: &Step,
        method: HttpMethod,
        url: &str,
        body: Option<&str>,
    ) -> StepOutcome {
        let start = Instant::now();
        let m = match method {
            HttpMethod::Get => reqwest::Method::GET,
            HttpMethod::Post => reqwest::Method::POST,
            HttpMethod::Put => reqwest::Method::PUT,
        };
        let mut req = self.http.request(m, url).timeout(step.timeout);
        if let Some(b) = body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(b.to_string());
        }
        match req.send().await {
            Ok(resp) => {
                let status = resp.status();
                let text = read_text_capped(resp, self.output_cap).await;
                StepOutcome {
                    status: if status.is_success() {
                        StepStatus::Succeeded
                    } else {
                        StepStatus::Failed
                    },
                    exit_code: None,
                    output: format!("HTTP {}\n{}", status.as_u16(), text.0),
                    duration: start.elapsed(),
                    truncated: text.1,
                }
            }
            Err(e) if e.is_timeout() => StepOutcome {
                status: StepStatus::TimedOut,
                exit_code: None,
                output: format!(
                    "no answer within {}",
                    humantime::format_duration(step.timeout)
                ),
                duration: start.elapsed(),
                truncated: false,
            },
            Err(e) => StepOutcome::error(
                crate::telemetry::redact(&format!("request failed: {e}")),
                start.elapsed(),
            ),
        }
    }

    async fn promql(&self, step: &Step, query: &str) -> StepOutcome {
        let Some(base) = &self.prometheus_url else {
            return StepOutcome::skipped(
                "skipped: no Prometheus URL (set GPUOPS_PROMETHEUS_URL, or run it from the bot)",
            );
        };
        let start = Instant::now();
        let url = format!("{base}/api/v1/query");
        let timeout_param = format!("{}s", step.timeout.as_secs().max(1));
        let resp = self
            .http
            .get(&url)
            .query(&[("query", query), ("timeout", timeout_param.as_str())])
            .timeout(step.timeout)
            .send()
            .await;
        let resp = match resp {
            Ok(r) => r,
            Err(e) if e.is_timeout() => {
                return StepOutcome {
                    status: StepStatus::TimedOut,
                    exit_code: None,
                    output: format!(
                        "Prometheus did not answer within {}",
                        humantime::format_duration(step.timeout)
                    ),
                    duration: start.elapsed(),
                    truncated: false,
                }
            }
            Err(e) => {
                return StepOutcome::error(
                    crate::telemetry::redact(&format!("query failed: {e}")),
                    start.elapsed(),
                )
            }
        };
        let status = resp.status();
        let (text, _) = read_text_capped(resp, 4 * 1024 * 1024).await;
        let (ok, mut output) = format_promql_response(&text);
        // `fail_if_any`: a series in the answer is the failure checked for;
        // `fail_if_none`: an answer without series is. Only a successful
        // answer is read (an error fails the step anyway).
        let (fail_if_any, fail_if_none) = match step.action {
            Action::Promql {
                fail_if_any,
                fail_if_none,
                ..
            } => (fail_if_any, fail_if_none),
            _ => (false, false),
        };
        let series = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["data"]["result"].as_array().map(|a| !a.is_empty()));
        let found = match series {
            Some(true) if fail_if_any => {
                output.push_str("(fail_if_any: the query returned series)\n");
                true
            }
            Some(false) if fail_if_none && ok && status.is_success() => {
                output.push_str("(fail_if_none: the query returned no series)\n");
                true
            }
            _ => false,
        };
        let (output, truncated) = cap_text(output, self.output_cap);
        StepOutcome {
            status: if ok && status.is_success() && !found {
                StepStatus::Succeeded
            } else {
                StepStatus::Failed
            },
            exit_code: None,
            output,
            duration: start.elapsed(),
            truncated,
        }
    }
}

impl StepExecutor for Executor {
    fn execute<'a>(
        &'a self,
        plan: &'a RunPlan,
        step: &'a PlannedStep,
    ) -> BoxFuture<'a, StepOutcome> {
        Box::pin(async move {
            let here = step.step.target == StepTarget::Bot || matches!(self.node, NodeSteps::Local);
            if let (true, Some(path)) = (here, &step.step.flow.only_if_exists) {
                if !crate::host::path_exists(std::path::Path::new(path)) {
                    return StepOutcome::unavailable(path, "here");
                }
            }
            if let Err(why) = self.node_request_allowed(plan, step).await {
                return StepOutcome::error(why, Duration::ZERO);
            }
            match (&step.rendered, step.step.target) {
                (Rendered::Command { argv }, StepTarget::Node) => match &self.node {
                    NodeSteps::Local => self.command_here(step, argv).await,
                    #[cfg(feature = "bot")]
                    NodeSteps::Agent(agent) => agent.execute(plan, step).await,
                    NodeSteps::Unavailable(why) => StepOutcome::error(why.clone(), Duration::ZERO),
                },
                (Rendered::Command { argv }, StepTarget::Bot) => {
                    self.command_here(step, argv).await
                }
                (Rendered::Http { method, url, body }, _) => {
                    self.http_step(&step.step, *method, url, body.as_deref())
                        .await
                }
                (Rendered::Promql { query }, _) => self.promql(&step.step, query).await,
            }
        })
    }

    fn plan<'a>(&'a self, plan: &'a RunPlan, step: &'a PlannedStep) -> BoxFuture<'a, StepPlan> {
        Box::pin(async move {
            let Rendered::Command { argv } = &step.rendered else {
                return StepPlan::assumed(&step.rendered);
            };
            if let Err(why) = self.node_request_allowed(plan, step).await {
                return StepPlan::failed(why);
            }
            match (step.step.target, &self.node) {
                #[cfg(feature = "bot")]
                (StepTarget::Node, NodeSteps::Agent(agent)) => agent.plan(plan, step).await,
                (StepTarget::Node, NodeSteps::Unavailable(why)) => StepPlan::failed(why.clone()),
                _ => {
                    let path = self.search_path.clone();
                    let where_ = self.here_name(&step.step);
                    let ps = step.clone();
                    // stat calls only, off the async threads, bounded.
                    let task = tokio::task::spawn_blocking(move || plan_here(&ps, &path, where_));
                    match tokio::time::timeout(LOCAL_PLAN_DEADLINE, task).await {
                        Ok(Ok(p)) => p,
                        _ => StepPlan::unavailable(
                            argv,
                            format!("its binaries could not be looked up on {where_} in time"),
                        ),
                    }
                }
            }
        })
    }
}

/// Deadline for resolving a local step's binaries.
pub const LOCAL_PLAN_DEADLINE: Duration = Duration::from_secs(2);

impl Executor {
    /// Runs a bot-side (or, for `gpuops runbook run`, local) command: the
    /// planned argv, or the rendered one resolved now.
    async fn command_here(&self, step: &PlannedStep, argv: &[String]) -> StepOutcome {
        let resolved = match &step.planned_argv {
            Some(a) => a.clone(),
            None => match resolve_argv(argv, &self.search_path) {
                Ok(a) => a,
                Err(e) => {
                    return StepOutcome::unavailable_because(
                        &e.reason_on(self.here_name(&step.step)),
                    )
                }
            },
        };
        self.command(&step.step, &resolved).await
    }
}

/// The host of `host:port`, `[v6]:port` or a bare host.
fn host_of_instance(instance: &str) -> &str {
    if let Some(rest) = instance.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match instance.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) && !h.contains(':') => h,
        _ => instance,
    }
}

/// Runs nothing: every step comes back `Skipped` with what it would have
/// done, and is recorded (for a dry run from chat, and for tests).
#[derive(Debug, Default)]
pub struct DryRunExecutor {
    seen: std::sync::Mutex<Vec<(String, Rendered)>>,
}

impl DryRunExecutor {
    pub fn new() -> DryRunExecutor {
        DryRunExecutor::default()
    }

    /// (step name, rendered step) in the order asked.
    pub fn seen(&self) -> Vec<(String, Rendered)> {
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl StepExecutor for DryRunExecutor {
    fn execute<'a>(
        &'a self,
        _plan: &'a RunPlan,
        step: &'a PlannedStep,
    ) -> BoxFuture<'a, StepOutcome> {
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((step.step.name.clone(), step.rendered.clone()));
        let text = format!("dry run: would run {}", step.rendered.display());
        Box::pin(async move { StepOutcome::skipped(text) })
    }
}

#[cfg(feature = "bot")]
impl AgentClient {
    pub fn new(directory: Arc<dyn AgentDirectory>, signer: Arc<ExecSigner>) -> AgentClient {
        AgentClient {
            directory,
            signer,
            http: http_client(),
            basic_auth: None,
        }
    }

    /// With the TLS trust, client certificate and basic auth of `[agents]`.
    pub fn with_transport(
        mut self,
        t: &crate::config::bot::AgentTransport,
    ) -> Result<AgentClient, String> {
        self.http = agent_http_client(t)?;
        self.basic_auth = t.basic_auth.clone();
        Ok(self)
    }

    /// The directory this client asks (the chat side checks a run's node
    /// against it before starting).
    pub fn directory(&self) -> Arc<dyn AgentDirectory> {
        self.directory.clone()
    }

    /// The agent of the run's `instance`, checked against the run's `node`.
    async fn target(&self, plan: &RunPlan) -> Result<AgentAddr, String> {
        let Some(instance) = plan.labels.get("instance") else {
            return Err("the alert has no instance label to find its agent".into());
        };
        let agent = self.directory.agent(instance).await?;
        if let Some(n) = plan.params.as_map().get("node") {
            if *n != agent.node {
                return Err(format!(
                    "the run names node {n:?} but the agent at {instance} is node {:?}: not sent",
                    agent.node
                ));
            }
        }
        Ok(agent)
    }

    /// Signs `req` and posts it to `base` + `path`; `Err` words a transport failure.
    async fn send(
        &self,
        base: &str,
        path: &str,
        req: &crate::exec_auth::SignedExec,
        timeout: Duration,
    ) -> Result<reqwest::Response, String> {
        let (body, headers) = self.signer.sign(req);
        let mut builder = self
            .http
            .post(format!("{base}{path}"))
            .timeout(timeout)
            .header(reqwest::header::CONTENT_TYPE, "application/json");
        for (k, v) in headers {
            builder = builder.header(k, v);
        }
        if let Some((user, password)) = &self.basic_auth {
            builder = builder.basic_auth(user, Some(password.expose()));
        }
        builder.body(body).send().await.map_err(|e| {
            if e.is_timeout() {
                format!("agent at {base} did not answer in time")
            } else {
                crate::telemetry::redact(&format!("cannot reach agent at {base}: {e}"))
            }
        })
    }

    /// Sends one node step to the alert's agent, signed, with a deadline of
    /// the step timeout plus [`AGENT_MARGIN`]. The argv signed is the
    /// step's planned one; a step not planned yet is planned first (one
    /// more round trip), and one its plan says cannot run is not sent.
    pub async fn execute(&self, plan: &RunPlan, step: &PlannedStep) -> StepOutcome {
        let start = Instant::now();
        let agent = match self.target(plan).await {
            Ok(a) => a,
            Err(e) => return StepOutcome::error(e, start.elapsed()),
        };
        if !matches!(step.rendered, Rendered::Command { .. }) {
            return StepOutcome::error("only command steps run on agents", start.elapsed());
        }
        let argv = match &step.planned_argv {
            Some(a) => a.clone(),
            None => {
                let p = self.plan(plan, step).await;
                if p.failed {
                    return StepOutcome::error(p.reason_text(), start.elapsed());
                }
                if !p.available {
                    return StepOutcome::unavailable_because(p.reason_text());
                }
                p.argv
            }
        };
        let base = agent.url.trim_end_matches('/').to_string();
        let req = ExecSigner::request(
            &agent.node,
            &plan.runbook.id,
            &step.step.name,
            plan.params.as_map().clone(),
            &argv,
            step.approval.clone(),
            signing::SystemClock.now_unix(),
        );
        let resp = match self
            .send(&base, "/v1/exec", &req, step.step.timeout + AGENT_MARGIN)
            .await
        {
            Ok(r) => r,
            Err(e) if e.ends_with("did not answer in time") => {
                return StepOutcome {
                    status: StepStatus::TimedOut,
                    exit_code: None,
                    output: e,
                    duration: start.elapsed(),
                    truncated: false,
                }
            }
            Err(e) => return StepOutcome::error(e, start.elapsed()),
        };
        let status = resp.status();
        let (text, _) = read_text_capped(resp, 64 * 1024 * 1024).await;
        if !status.is_success() {
            let (text, _) = cap_text(text, 2048);
            return StepOutcome::error(
                format!(
                    "agent at {base} refused: HTTP {}: {} (the bot signed: {})",
                    status.as_u16(),
                    text.trim(),
                    Rendered::Command { argv }.display()
                ),
                start.elapsed(),
            );
        }
        match serde_json::from_str::<ExecResponse>(&text) {
            Ok(r) => {
                if let Some(what) = r.unavailable {
                    // A path (its `only_if_exists`), or the node's reason.
                    return if what.starts_with('/') {
                        StepOutcome::unavailable(&what, &format!("on node {}", agent.node))
                    } else {
                        StepOutcome::unavailable_because(&what)
                    };
                }
                if let Some(e) = r.error {
                    return StepOutcome::error(
                        e,
                        Duration::from_secs_f64(r.duration_seconds.max(0.0)),
                    );
                }
                StepOutcome::from_command(
                    CommandOutput {
                        exit_code: r.exit_code,
                        stdout: r.stdout,
                        stderr: r.stderr,
                        duration: Duration::try_from_secs_f64(r.duration_seconds)
                            .unwrap_or(start.elapsed()),
                        timed_out: r.timed_out,
                        truncated: r.truncated,
                    },
                    step.step.nothing_found_exit,
                )
            }
            Err(e) => StepOutcome::error(
                format!("agent at {base} sent an unreadable answer: {e}"),
                start.elapsed(),
            ),
        }
    }
}

impl ExecResponse {
    pub fn from_output(out: &CommandOutput) -> ExecResponse {
        ExecResponse {
            exit_code: out.exit_code,
            stdout: out.stdout.clone(),
            stderr: out.stderr.clone(),
            duration_seconds: out.duration.as_secs_f64(),
            timed_out: out.timed_out,
            truncated: out.truncated,
            error: None,
            unavailable: None,
        }
    }

    pub fn from_error(e: &RunError) -> ExecResponse {
        ExecResponse {
            exit_code: None,
            stdout: String::new(),
            stderr: String::new(),
            duration_seconds: 0.0,
            timed_out: false,
            truncated: false,
            error: Some(e.to_string()),
            unavailable: None,
        }
    }
}

/// Quotes an argument for human reading (POSIX single quotes when needed).
pub fn quote_for_display(a: &str) -> String {
    if !a.is_empty()
        && a.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'-' | b'_' | b'.' | b'/' | b'=' | b':' | b',' | b'@' | b'%' | b'+'
                )
        })
    {
        a.to_string()
    } else {
        format!("'{}'", a.replace('\'', "'\\''"))
    }
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap_or_else(|_| reqwest::Client::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exited(code: i32, stdout: &str) -> CommandOutput {
        CommandOutput {
            exit_code: Some(code),
            stdout: stdout.into(),
            stderr: String::new(),
            duration: Duration::from_millis(5),
            timed_out: false,
            truncated: false,
        }
    }

    /// A healthy node's kernel log has no XID: `journalctl --grep` exits 1
    /// with "-- No entries --" (this machine's journalctl too). With `nothing_found_exit: 1` that is a
    /// succeeded investigation that says it found nothing, not a failure.
    #[test]
    fn investigation_that_finds_nothing_is_not_a_failure() {
        let o = StepOutcome::from_command(exited(1, "-- No entries --\n"), Some(1));
        assert_eq!(o.status, StepStatus::Succeeded);
        assert_eq!(o.output, "-- No entries --\n(nothing found: exit 1)\n");
        assert_eq!(o.exit_code, Some(1));
        // Another status is still a failure, and without the key 1 is too.
        assert_eq!(
            StepOutcome::from_command(exited(2, ""), Some(1)).status,
            StepStatus::Failed
        );
        assert_eq!(
            StepOutcome::from_command(exited(1, ""), None).status,
            StepStatus::Failed
        );
        // journalctl with no journal at all exits 1 too: it could not
        // look, and says so on stderr. That is not "nothing found".
        let mut blind = exited(1, "-- No entries --\n");
        blind.stderr = "No journal files were found.\n".into();
        let o = StepOutcome::from_command(blind, Some(1));
        assert_eq!(o.status, StepStatus::Failed);
        assert!(!o.output.contains("nothing found"), "{}", o.output);
        // A command killed at its deadline never "found nothing".
        let mut late = exited(1, "");
        late.timed_out = true;
        assert_eq!(
            StepOutcome::from_command(late, Some(1)).status,
            StepStatus::TimedOut
        );
    }
}
