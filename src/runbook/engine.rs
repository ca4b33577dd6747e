//! The runbook engine: turns a [`Runbook`] plus parameters and alert labels
//! into a [`RunPlan`] of rendered steps, runs one step at a time through a
//! [`StepExecutor`]. Who may do what is decided in the `rbac` module.
//!
//! The engine does not iterate a whole run by itself, ask for approvals or
//! post anything: callers (the CLI, the chat commands) walk the plan, ask
//! [`next_action`] whether each step runs (the one step-flow rule), enforce
//! `needs_approval` and roles with `rbac`'s functions, show each
//! [`StepOutcome`], and end with [`node_state`]. Processes are spawned only through a
//! [`CommandRunner`]; node steps for the bot go to the node's agent as
//! `POST /v1/exec` requests signed for that one agent ([`AgentClient`]),
//! only to agents an [`AgentDirectory`] (the bot's inventory) knows.
//!
//! For an alert, the chat side does:
//! ```text
//! let (set, errors) = RunbookSet::load_dir(dir);           // log errors, keep the valid ones
//! let rb = set.suggest(&alert_labels)[0];                   // or set.get(id) for `/gpuops run`
//! let plan = engine::plan(rb, &given_k_v, &alert_labels)?;  // ParamErrors: show to the user
//! let exec = Executor::new(Arc::new(ProcessRunner),
//!     NodeSteps::Agent(AgentClient::new(inventory, signer)), Some(prometheus_url));
//! for s in plan.steps_in(Phase::Investigate) {
//!     rbac::authorize(role, ChatAction::RunStep, Some(&s.step))?;
//!     // s.step.needs_approval: wait for rbac::authorize_approval(approver, requester, &s.step)
//!     let outcome = exec.execute(&plan, s).await;             // post s.header(n) + outcome.output
//! }
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::exec_auth::{ExecSigner, SignedApproval};
use crate::runbook::exec::{BoxFuture, CommandOutput, CommandRunner, CommandSpec, RunError};
use crate::runbook::{
    Action, Escape, HttpMethod, ParamErrors, Params, Phase, Runbook, Step, Target,
};
use crate::signing::{self, Clock as _};

/// Added to a step's timeout for the HTTP round trip to an agent.
pub const AGENT_MARGIN: Duration = Duration::from_secs(10);
/// Default cap on the output kept per step (each of stdout and stderr).
pub const DEFAULT_OUTPUT_CAP: usize = 64 * 1024;

/// A runbook with its parameters resolved and every step rendered.
#[derive(Debug, Clone)]
pub struct RunPlan {
    pub runbook: Runbook,
    pub params: Params,
    /// The alert's labels (empty for a run started by hand).
    pub labels: BTreeMap<String, String>,
    pub steps: Vec<PlannedStep>,
}

/// One step and what it will do, with parameters substituted.
#[derive(Debug, Clone)]
pub struct PlannedStep {
    pub index: usize,
    pub step: Step,
    pub rendered: Rendered,
    /// Set by the caller once a `needs_approval` step is approved; a node
    /// step carries it to the agent inside the signed request.
    pub approval: Option<SignedApproval>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rendered {
    Command {
        argv: Vec<String>,
    },
    Http {
        method: HttpMethod,
        url: String,
        body: Option<String>,
    },
    Promql {
        query: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// Exit code 0, HTTP 2xx, or a PromQL answer.
    Succeeded,
    /// Ran and failed (non-zero exit, HTTP error status, PromQL error).
    Failed,
    TimedOut,
    /// Not run (no Prometheus URL, refused approval…); `output` says why.
    Skipped,
    /// Could not be run (spawn failure, agent unreachable, agent refused).
    Error,
    /// Not run: its `only_if_exists` path is missing where it would run
    /// (the next member of its alternative group is tried).
    Unavailable,
    /// Not run: the approval was denied (or declined at the CLI prompt).
    Denied,
    /// Not run: nobody approved it in time.
    Expired,
}

impl StepStatus {
    /// The stored name (`succeeded`, `timed_out`…).
    pub fn as_str(self) -> &'static str {
        match self {
            StepStatus::Succeeded => "succeeded",
            StepStatus::Failed => "failed",
            StepStatus::TimedOut => "timed_out",
            StepStatus::Skipped => "skipped",
            StepStatus::Error => "error",
            StepStatus::Unavailable => "unavailable",
            StepStatus::Denied => "denied",
            StepStatus::Expired => "expired",
        }
    }

    /// The inverse of [`StepStatus::as_str`].
    pub fn parse(s: &str) -> Option<StepStatus> {
        Some(match s {
            "succeeded" => StepStatus::Succeeded,
            "failed" => StepStatus::Failed,
            "timed_out" => StepStatus::TimedOut,
            "skipped" => StepStatus::Skipped,
            "error" => StepStatus::Error,
            "unavailable" => StepStatus::Unavailable,
            "denied" => StepStatus::Denied,
            "expired" => StepStatus::Expired,
            _ => return None,
        })
    }

    /// For reasons: `drain failed`, `drain was denied`.
    pub fn as_reason(self) -> &'static str {
        match self {
            StepStatus::Succeeded => "succeeded",
            StepStatus::Failed => "failed",
            StepStatus::TimedOut => "timed out",
            StepStatus::Skipped => "was skipped",
            StepStatus::Error => "could not be run",
            StepStatus::Unavailable => "is not available there",
            StepStatus::Denied => "was denied",
            StepStatus::Expired => "was not approved in time",
        }
    }
}

/// What the run does with a step next ([`next_action`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NextAction {
    /// Run it (after the caller's role and approval checks).
    Run,
    /// Do not run it; the reason starts with `skipped:`.
    Skip(String),
}

/// The one rule that decides whether a step runs, given what the earlier
/// steps of this run came to (`done`: step name and status, in the order
/// they got them; steps not selected for the run are simply absent). Both
/// the chat runs and `gpuops runbook run` call it.
///
/// - Escalation steps always run (or are offered for approval).
/// - A member of an alternative group runs only while every earlier member
///   of the group was `unavailable`; once one got any other outcome, the
///   group is decided and later members are skipped.
/// - `when: previous_succeeded`: the last step that got an outcome succeeded.
/// - `requires`: every named step (or some member of the named alternative
///   group) succeeded in this run; a name that did not run here is not met.
/// - A mitigation without `when`/`requires` is held back by every earlier
///   mitigation of this run: it is skipped once one of them failed, timed
///   out, was denied, expired or was skipped (the safe default: a reset
///   never follows a drain that did not happen). One that was unavailable
///   (another alternative ran) or could not be run at all (changed nothing)
///   does not hold it back. `requires: []` declares a mitigation
///   independent of the earlier ones.
pub fn next_action(plan: &RunPlan, index: usize, done: &[(String, StepStatus)]) -> NextAction {
    let Some(ps) = plan.steps.get(index) else {
        return NextAction::Skip("skipped: no such step".into());
    };
    let step = &ps.step;
    if step.phase == Phase::Escalate {
        return NextAction::Run;
    }
    let status_of = |name: &str| done.iter().rev().find(|(n, _)| n == name).map(|(_, s)| *s);
    let group_of = |name: &str| {
        plan.step(name)
            .and_then(|p| p.step.flow.alternative.clone())
    };
    if let Some(g) = &step.flow.alternative {
        if let Some((m, st)) = done.iter().find(|(n, st)| {
            *st != StepStatus::Unavailable && group_of(n).as_deref() == Some(g.as_str())
        }) {
            return NextAction::Skip(match st {
                StepStatus::Succeeded => format!("skipped: alternative {m} of {g} was used"),
                other => format!(
                    "skipped: {g} was decided by {m}, which {}",
                    other.as_reason()
                ),
            });
        }
    }
    if step.flow.previous_succeeded {
        match done.last() {
            None => return NextAction::Skip("skipped: no earlier step ran in this run".into()),
            Some((n, st)) if *st != StepStatus::Succeeded => {
                return NextAction::Skip(format!("skipped: {n} {}", st.as_reason()))
            }
            Some(_) => {}
        }
    }
    for r in &step.flow.requires {
        if plan.step(r).is_some() {
            match status_of(r) {
                Some(StepStatus::Succeeded) => {}
                Some(st) => return NextAction::Skip(format!("skipped: {r} {}", st.as_reason())),
                None => return NextAction::Skip(format!("skipped: {r} did not run in this run")),
            }
        } else {
            let members: Vec<&(String, StepStatus)> = done
                .iter()
                .filter(|(n, _)| group_of(n).as_deref() == Some(r.as_str()))
                .collect();
            if !members.iter().any(|(_, st)| *st == StepStatus::Succeeded) {
                return NextAction::Skip(
                    match members
                        .iter()
                        .find(|(_, st)| *st != StepStatus::Unavailable)
                        .or(members.last())
                    {
                        Some((n, st)) => {
                            format!("skipped: {r} did not succeed ({n} {})", st.as_reason())
                        }
                        None => format!("skipped: {r} did not run in this run"),
                    },
                );
            }
        }
    }
    if step.phase == Phase::Mitigate && !step.flow.declared {
        let failed = done.iter().find(|(n, st)| {
            matches!(
                st,
                StepStatus::Failed
                    | StepStatus::TimedOut
                    | StepStatus::Denied
                    | StepStatus::Expired
                    | StepStatus::Skipped
            ) && plan
                .step(n)
                .is_some_and(|p| p.step.phase == Phase::Mitigate)
        });
        if let Some((n, st)) = failed {
            return NextAction::Skip(format!("skipped: {n} {}", st.as_reason()));
        }
    }
    NextAction::Run
}

/// The node's state in plain words after a run, from its mitigations'
/// outcomes: each mitigation that ran says its `state_on_success` or
/// `state_on_failure` (or, without them, that it succeeded or failed); when
/// no mitigation ran: "NODE was not changed; it is still serving jobs".
pub fn node_state(plan: &RunPlan, done: &[(String, StepStatus)]) -> Vec<String> {
    let node = plan
        .params
        .get("node")
        .or_else(|| plan.labels.get("node").map(String::as_str))
        .or_else(|| plan.labels.get("instance").map(String::as_str))
        .unwrap_or("the node")
        .to_string();
    let mut lines = Vec::new();
    for (name, st) in done {
        let Some(ps) = plan.step(name) else { continue };
        if ps.step.phase != Phase::Mitigate {
            continue;
        }
        let (template, fallback) = match st {
            StepStatus::Succeeded => (
                &ps.step.state_on_success,
                format!("{name} succeeded on {node}"),
            ),
            StepStatus::Failed | StepStatus::TimedOut => (
                &ps.step.state_on_failure,
                format!(
                    "{name} {} on {node}: its change may be partly made",
                    st.as_reason()
                ),
            ),
            _ => continue,
        };
        let text = template
            .as_ref()
            .and_then(|t| t.render(&plan.params, Escape::None).ok())
            .unwrap_or(fallback);
        lines.push(text);
    }
    if lines.is_empty() {
        lines.push(format!("{node} was not changed; it is still serving jobs"));
    }
    lines
}

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

/// Runs one planned step.
pub trait StepExecutor: Send + Sync {
    fn execute<'a>(
        &'a self,
        plan: &'a RunPlan,
        step: &'a PlannedStep,
    ) -> BoxFuture<'a, StepOutcome>;
}

/// Where `target: node` command steps go.
pub enum NodeSteps {
    /// Run here through the command runner (`gpuops runbook run` on the node).
    Local,
    /// Send to the node's agent (the bot).
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
}

/// Signs and sends node steps to the agents a directory knows.
pub struct AgentClient {
    directory: Arc<dyn AgentDirectory>,
    signer: Arc<ExecSigner>,
    http: reqwest::Client,
    basic_auth: Option<(String, crate::config::Secret)>,
}

/// The HTTP client for requests to agents: their CA, the bot's client
/// certificate, no redirects.
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
    /// Set when the step's `only_if_exists` path is missing on the node: the
    /// command was not run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unavailable: Option<String>,
}

/// Builds a run plan: resolves parameters (given, then `from_label` alert
/// labels, then defaults; each against its pattern) and renders every step.
pub fn plan(
    runbook: &Runbook,
    given: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> Result<RunPlan, ParamErrors> {
    let params = runbook.resolve_params(given, labels)?;
    let mut steps = Vec::new();
    for (index, step) in runbook.steps.iter().enumerate() {
        steps.push(PlannedStep {
            index,
            step: step.clone(),
            rendered: render(step, &params)?,
            approval: None,
        });
    }
    Ok(RunPlan {
        runbook: runbook.clone(),
        params,
        labels: labels.clone(),
        steps,
    })
}

/// Renders one step with validated parameters.
pub fn render(step: &Step, params: &Params) -> Result<Rendered, ParamErrors> {
    Ok(match &step.action {
        Action::Command { argv } => Rendered::Command {
            argv: argv
                .iter()
                .map(|t| t.render(params, Escape::None))
                .collect::<Result<_, _>>()?,
        },
        Action::Http { method, url, body } => Rendered::Http {
            method: *method,
            url: url.render(params, Escape::Url)?,
            body: body
                .as_ref()
                .map(|b| b.render(params, Escape::Json))
                .transpose()?,
        },
        Action::Promql { query } => Rendered::Promql {
            query: query.render(params, Escape::Promql)?,
        },
    })
}

impl RunPlan {
    /// The planned step called `name`.
    pub fn step(&self, name: &str) -> Option<&PlannedStep> {
        self.steps.iter().find(|s| s.step.name == name)
    }

    /// The planned steps of one phase, in file order.
    pub fn steps_in(&self, phase: Phase) -> impl Iterator<Item = &PlannedStep> {
        self.steps.iter().filter(move |s| s.step.phase == phase)
    }
}

impl Rendered {
    /// One line for a dry run or a chat message: the argv shell-quoted (for
    /// reading only; it is never given to a shell), the request or the query.
    pub fn display(&self) -> String {
        match self {
            Rendered::Command { argv } => argv
                .iter()
                .map(|a| quote_for_display(a))
                .collect::<Vec<_>>()
                .join(" "),
            Rendered::Http { method, url, body } => match body {
                Some(b) => format!("{} {url} {b}", method.as_str()),
                None => format!("{} {url}", method.as_str()),
            },
            Rendered::Promql { query } => format!("promql: {query}"),
        }
    }
}

impl PlannedStep {
    /// A header line: `[2/7] mitigate drain-slurm (node command, 30s, needs approval)`.
    pub fn header(&self, total: usize) -> String {
        let s = &self.step;
        format!(
            "[{}/{}] {} {} ({} {}, {}{})",
            self.index + 1,
            total,
            s.phase.as_str(),
            s.name,
            s.target.as_str(),
            s.kind().as_str(),
            humantime::format_duration(s.timeout),
            if s.needs_approval {
                ", needs approval"
            } else {
                ""
            }
        )
    }
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

    fn from_command(out: CommandOutput) -> StepOutcome {
        let status = if out.timed_out {
            StepStatus::TimedOut
        } else if out.exit_code == Some(0) {
            StepStatus::Succeeded
        } else {
            StepStatus::Failed
        };
        let mut output = out.stdout;
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
        Executor {
            runner,
            node,
            prometheus_url: prometheus_url.map(|u| u.trim_end_matches('/').to_string()),
            output_cap: DEFAULT_OUTPUT_CAP,
            http: http_client(),
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
            Ok(out) => StepOutcome::from_command(out),
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
        let (ok, output) = format_promql_response(&text);
        let (output, truncated) = cap_text(output, self.output_cap);
        StepOutcome {
            status: if ok && status.is_success() {
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
            let here = step.step.target == Target::Bot || matches!(self.node, NodeSteps::Local);
            if let (true, Some(path)) = (here, &step.step.flow.only_if_exists) {
                if !crate::host::path_exists(std::path::Path::new(path)) {
                    return StepOutcome::unavailable(path, "here");
                }
            }
            match (&step.rendered, step.step.target) {
                (Rendered::Command { argv }, Target::Bot) => self.command(&step.step, argv).await,
                (Rendered::Command { argv }, Target::Node) => match &self.node {
                    NodeSteps::Local => self.command(&step.step, argv).await,
                    NodeSteps::Agent(agent) => agent.execute(plan, step).await,
                    NodeSteps::Unavailable(why) => StepOutcome::error(why.clone(), Duration::ZERO),
                },
                (Rendered::Http { method, url, body }, _) => {
                    self.http_step(&step.step, *method, url, body.as_deref())
                        .await
                }
                (Rendered::Promql { query }, _) => self.promql(&step.step, query).await,
            }
        })
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

    /// Sends one node step to the alert's agent, signed, with a deadline of
    /// the step timeout plus [`AGENT_MARGIN`].
    pub async fn execute(&self, plan: &RunPlan, step: &PlannedStep) -> StepOutcome {
        let start = Instant::now();
        let Some(instance) = plan.labels.get("instance") else {
            return StepOutcome::error(
                "the alert has no instance label to find its agent",
                start.elapsed(),
            );
        };
        let agent = match self.directory.agent(instance).await {
            Ok(a) => a,
            Err(e) => return StepOutcome::error(e, start.elapsed()),
        };
        if let Some(n) = plan.params.as_map().get("node") {
            if *n != agent.node {
                return StepOutcome::error(
                    format!(
                        "the run names node {n:?} but the agent at {instance} is node {:?}: not sent",
                        agent.node
                    ),
                    start.elapsed(),
                );
            }
        }
        let Rendered::Command { argv } = &step.rendered else {
            return StepOutcome::error("only command steps run on agents", start.elapsed());
        };
        let base = agent.url.trim_end_matches('/').to_string();
        let req = ExecSigner::request(
            &agent.node,
            &plan.runbook.id,
            &step.step.name,
            plan.params.as_map().clone(),
            argv,
            step.approval.clone(),
            signing::SystemClock.now_unix(),
        );
        let (body, headers) = self.signer.sign(&req);
        let mut builder = self
            .http
            .post(format!("{base}/v1/exec"))
            .timeout(step.step.timeout + AGENT_MARGIN)
            .header(reqwest::header::CONTENT_TYPE, "application/json");
        for (k, v) in headers {
            builder = builder.header(k, v);
        }
        if let Some((user, password)) = &self.basic_auth {
            builder = builder.basic_auth(user, Some(password.expose()));
        }
        let resp = match builder.body(body).send().await {
            Ok(r) => r,
            Err(e) if e.is_timeout() => {
                return StepOutcome {
                    status: StepStatus::TimedOut,
                    exit_code: None,
                    output: format!("agent at {base} did not answer in time"),
                    duration: start.elapsed(),
                    truncated: false,
                }
            }
            Err(e) => {
                return StepOutcome::error(
                    crate::telemetry::redact(&format!("cannot reach agent at {base}: {e}")),
                    start.elapsed(),
                )
            }
        };
        let status = resp.status();
        let (text, _) = read_text_capped(resp, 64 * 1024 * 1024).await;
        if !status.is_success() {
            let (text, _) = cap_text(text, 2048);
            return StepOutcome::error(
                format!(
                    "agent at {base} refused: HTTP {}: {}",
                    status.as_u16(),
                    text.trim()
                ),
                start.elapsed(),
            );
        }
        match serde_json::from_str::<ExecResponse>(&text) {
            Ok(r) => {
                if let Some(path) = r.unavailable {
                    return StepOutcome::unavailable(&path, &format!("on node {}", agent.node));
                }
                if let Some(e) = r.error {
                    return StepOutcome::error(
                        e,
                        Duration::from_secs_f64(r.duration_seconds.max(0.0)),
                    );
                }
                StepOutcome::from_command(CommandOutput {
                    exit_code: r.exit_code,
                    stdout: r.stdout,
                    stderr: r.stderr,
                    duration: Duration::try_from_secs_f64(r.duration_seconds)
                        .unwrap_or(start.elapsed()),
                    timed_out: r.timed_out,
                    truncated: r.truncated,
                })
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

async fn read_text_capped(mut resp: reqwest::Response, cap: usize) -> (String, bool) {
    let mut kept = Vec::new();
    let mut cut = false;
    while let Ok(Some(chunk)) = resp.chunk().await {
        let room = cap.saturating_sub(kept.len());
        if chunk.len() > room {
            cut = true;
            kept.extend_from_slice(&chunk[..room]);
            break;
        }
        kept.extend_from_slice(&chunk);
    }
    let mut s = String::from_utf8_lossy(&kept).into_owned();
    if cut {
        s.push_str(crate::runbook::exec::TRUNCATION_MARKER);
    }
    (s, cut)
}

fn cap_text(mut s: String, cap: usize) -> (String, bool) {
    if s.len() <= cap {
        return (s, false);
    }
    let mut end = cap;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s.push_str(crate::runbook::exec::TRUNCATION_MARKER);
    (s, true)
}

/// Formats a Prometheus `/api/v1/query` answer as text, one series a line.
pub fn format_promql_response(text: &str) -> (bool, String) {
    let v: serde_json::Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(_) => return (false, format!("not a Prometheus answer: {}", text.trim())),
    };
    if v["status"] != "success" {
        return (
            false,
            format!(
                "query failed: {} {}",
                v["errorType"].as_str().unwrap_or(""),
                v["error"].as_str().unwrap_or("")
            ),
        );
    }
    let data = &v["data"];
    let mut out = String::new();
    let series_name = |m: &serde_json::Value| -> String {
        let Some(obj) = m.as_object() else {
            return "{}".into();
        };
        let name = obj.get("__name__").and_then(|n| n.as_str()).unwrap_or("");
        let labels: Vec<String> = obj
            .iter()
            .filter(|(k, _)| k.as_str() != "__name__")
            .map(|(k, v)| format!("{k}={:?}", v.as_str().unwrap_or("")))
            .collect();
        format!("{name}{{{}}}", labels.join(", "))
    };
    match data["resultType"].as_str() {
        Some("vector") => {
            let r = data["result"].as_array().cloned().unwrap_or_default();
            if r.is_empty() {
                out.push_str("(no series)\n");
            }
            for s in r {
                let _ = writeln!(
                    out,
                    "{} {}",
                    series_name(&s["metric"]),
                    s["value"][1].as_str().unwrap_or("?")
                );
            }
        }
        Some("matrix") => {
            for s in data["result"].as_array().cloned().unwrap_or_default() {
                let n = s["values"].as_array().map(|a| a.len()).unwrap_or(0);
                let last = s["values"]
                    .as_array()
                    .and_then(|a| a.last())
                    .and_then(|p| p[1].as_str())
                    .unwrap_or("?");
                let _ = writeln!(
                    out,
                    "{} last={last} ({n} samples)",
                    series_name(&s["metric"])
                );
            }
        }
        Some("scalar") | Some("string") => {
            let _ = writeln!(out, "{}", data["result"][1].as_str().unwrap_or("?"));
        }
        _ => out.push_str("(unrecognised result)\n"),
    }
    (true, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn promql_vector_formats_one_series_a_line() {
        let (ok, text) = format_promql_response(
            r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{"__name__":"up","instance":"n1:9949"},"value":[1,"1"]}]}}"#,
        );
        assert!(ok);
        assert_eq!(text, "up{instance=\"n1:9949\"} 1\n");
        let (ok, text) = format_promql_response(
            r#"{"status":"error","errorType":"bad_data","error":"parse error"}"#,
        );
        assert!(!ok);
        assert_eq!(text, "query failed: bad_data parse error");
    }

    #[tokio::test]
    async fn bot_without_agents_reports_node_steps_unavailable() {
        let cfg = crate::config::BotConfig::default();
        let exec = Executor::for_bot(&cfg);
        let rb = crate::runbook::parse_runbook(
            std::path::Path::new("t.yaml"),
            "id: t\ntitle: T\nsteps:\n- {name: a, phase: investigate, kind: command, target: node, run: [uptime]}\n",
        )
        .unwrap();
        let plan = plan(&rb, &BTreeMap::new(), &BTreeMap::new()).unwrap();
        let out = exec.execute(&plan, &plan.steps[0]).await;
        assert_eq!(out.status, StepStatus::Error);
        assert!(out.output.contains("[agents]"), "{}", out.output);
    }

    const FLOW: &str = r#"
id: t
title: T
params:
  node: { pattern: '[a-z0-9]+', default: n1 }
steps:
- {name: look, phase: investigate, kind: command, target: node, run: [uptime]}
- {name: drain-slurm, phase: mitigate, kind: command, target: node, run: [scontrol], alternative: drain, only_if_exists: /usr/bin/scontrol, needs_approval: true, state_on_success: "{{node}} is drained", state_on_failure: "{{node}} is NOT drained: drain failed"}
- {name: drain-k8s, phase: mitigate, kind: command, target: bot, run: [kubectl], alternative: drain, needs_approval: true, state_on_success: "{{node}} is cordoned"}
- {name: reset, phase: mitigate, kind: command, target: node, run: [nvidia-smi], requires: [drain], needs_approval: true, state_on_success: "{{node}} has a freshly reset GPU"}
- {name: check, phase: mitigate, kind: command, target: node, run: [nvidia-smi], when: previous_succeeded}
- {name: clear, phase: mitigate, kind: command, target: node, run: [echo]}
- {name: independent, phase: mitigate, kind: command, target: node, run: [echo], requires: []}
- {name: page, phase: escalate, kind: command, target: bot, run: [echo]}
"#;

    fn flow_check(done: &[(&str, StepStatus)], expect: expect_test::Expect) {
        let rb = crate::runbook::parse_runbook(std::path::Path::new("t.yaml"), FLOW).unwrap();
        let plan = plan(&rb, &BTreeMap::new(), &BTreeMap::new()).unwrap();
        let done: Vec<(String, StepStatus)> =
            done.iter().map(|(n, s)| (n.to_string(), *s)).collect();
        let mut out = String::new();
        for s in &plan.steps {
            if done.iter().any(|(n, _)| *n == s.step.name) {
                continue;
            }
            let _ = writeln!(
                out,
                "{}: {:?}",
                s.step.name,
                next_action(&plan, s.index, &done)
            );
        }
        let _ = write!(out, "state: {}", node_state(&plan, &done).join("; "));
        expect.assert_eq(&out);
    }

    #[test]
    fn next_action_follows_dependencies_alternatives_and_failures() {
        use expect_test::expect;
        use StepStatus::*;
        flow_check(
            &[("look", Succeeded), ("drain-slurm", Failed)],
            expect![[r#"
                drain-k8s: Skip("skipped: drain was decided by drain-slurm, which failed")
                reset: Skip("skipped: drain did not succeed (drain-slurm failed)")
                check: Skip("skipped: drain-slurm failed")
                clear: Skip("skipped: drain-slurm failed")
                independent: Run
                page: Run
                state: n1 is NOT drained: drain failed"#]],
        );
        flow_check(
            &[("look", Succeeded), ("drain-slurm", Unavailable)],
            expect![[r#"
                drain-k8s: Run
                reset: Skip("skipped: drain did not succeed (drain-slurm is not available there)")
                check: Skip("skipped: drain-slurm is not available there")
                clear: Run
                independent: Run
                page: Run
                state: n1 was not changed; it is still serving jobs"#]],
        );
        flow_check(
            &[("look", Succeeded), ("drain-slurm", Denied)],
            expect![[r#"
                drain-k8s: Skip("skipped: drain was decided by drain-slurm, which was denied")
                reset: Skip("skipped: drain did not succeed (drain-slurm was denied)")
                check: Skip("skipped: drain-slurm was denied")
                clear: Skip("skipped: drain-slurm was denied")
                independent: Run
                page: Run
                state: n1 was not changed; it is still serving jobs"#]],
        );
        flow_check(
            &[
                ("look", Succeeded),
                ("drain-slurm", Unavailable),
                ("drain-k8s", Succeeded),
                ("reset", Succeeded),
            ],
            expect![[r#"
                check: Run
                clear: Run
                independent: Run
                page: Run
                state: n1 is cordoned; n1 has a freshly reset GPU"#]],
        );
        flow_check(
            &[],
            expect![[r#"
                look: Run
                drain-slurm: Run
                drain-k8s: Run
                reset: Skip("skipped: drain did not run in this run")
                check: Skip("skipped: no earlier step ran in this run")
                clear: Run
                independent: Run
                page: Run
                state: n1 was not changed; it is still serving jobs"#]],
        );
    }

    #[test]
    fn hostports() {
        assert!(is_hostport("n1:9949"));
        assert!(is_hostport("10.0.0.1:9949"));
        assert!(is_hostport("[::1]:9949"));
        assert!(!is_hostport("evil.com/x?:1"));
        assert!(!is_hostport("a@b:1"));
        assert!(!is_hostport("n1"));
        assert!(!is_hostport("n1:0"));
    }

    #[test]
    fn display_quotes_only_for_reading() {
        assert_eq!(
            Rendered::Command {
                argv: vec!["echo".into(), "a b".into(), "it's".into(), "x=1".into()]
            }
            .display(),
            "echo 'a b' 'it'\\''s' x=1"
        );
    }
}
