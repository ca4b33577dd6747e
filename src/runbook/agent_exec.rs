//! The agent's `POST /v1/exec`: runs one command step of one runbook from
//! the node's own runbook directory, on a request signed by the bot's
//! Ed25519 key for this node, fresh and never seen (see `exec_auth`).
//!
//! Order of checks (shared with `POST /v1/plan`, `agent_exec/plan.rs`):
//! signature header present (else 401 before the body is read), body read
//! with a size limit (413), signature, window and nonce (401), the node it
//! names (403), what it is signed for (`purpose`: a plan-signed request is
//! 403 here), JSON shape (400), runbook file (404), step (404), step kind
//! and target (400), parameters re-validated against this node's patterns
//! (400), a `node` parameter naming another node (403). Then: a step whose
//! `only_if_exists` path is missing, or whose binary is not found on this
//! node's search path ([`resolve_argv`]: `scontrol` → `/opt/slurm/bin/scontrol`,
//! sudo's command too), is answered 200 with `unavailable` set and not run;
//! the resolved argv against the signed digest (403 naming both: the bot
//! signs the argv the plan answered), and the approval a `needs_approval`
//! step must carry (403).
//! The command runs through a
//! [`CommandRunner`] with the step's timeout and the configured output cap.
//! A `releases_gpu` step first releases the GPU backend (NVML closed and shut
//! down, the GPU collector paused and exporting `gpuops_gpu_released 1`; a
//! release that does not finish in time answers 503 and the step does not
//! run; one already released answers 409), and NVML is initialised again
//! after the step, whatever its outcome (also when the request is dropped).
//! Release and re-init each run through a [`SingleFlight`] with a deadline.
//! Every request is logged with its runbook, step, parameters, approval and
//! outcome. No route is added unless a public key is configured (see
//! [`router`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{to_bytes, Body};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};

use crate::config::agent::ExecConfig;
use crate::deadline::{Outcome, SingleFlight};
use crate::exec_auth::{argv_digest, ExecAuthError, ExecVerifier, Purpose, SignedExec};
use crate::gpu::{GpuBackend, GpuGate};
use crate::runbook::engine::{self, ExecResponse, Rendered};
use crate::runbook::exec::resolve::{resolve_argv, SearchPath};
use crate::runbook::exec::{CommandRunner, CommandSpec, ProcessRunner};
use crate::runbook::{is_runbook_id, load_file, Kind, Params, Runbook, Step, StepTarget};

mod plan;

use crate::signing::{Clock, SystemClock};
pub use plan::{nvml_holders, NVML_HOLDERS};

/// Largest request body read.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Steps running at once; more get 429.
pub const MAX_CONCURRENT: usize = 4;
/// Deadline for reading a runbook file.
pub const READ_DEADLINE: std::time::Duration = std::time::Duration::from_secs(2);
/// Deadline for releasing the GPU backend before a `releases_gpu` step (the
/// NVML backend waits up to [`crate::gpu::nvml::RELEASE_WAIT`] for calls in
/// flight, then `nvmlShutdown`).
pub const GPU_RELEASE_DEADLINE: Duration = Duration::from_secs(12);
/// Deadline for initialising the GPU backend again after the step.
pub const GPU_REINIT_DEADLINE: Duration = Duration::from_secs(20);

/// Releases the GPU backend around `releases_gpu` steps.
pub struct GpuRelease {
    gate: Arc<GpuGate>,
    flight: SingleFlight<&'static str, Result<(), String>>,
}

impl GpuRelease {
    pub fn new(gate: Arc<GpuGate>) -> GpuRelease {
        GpuRelease {
            gate,
            flight: SingleFlight::new("gpuops-gpu-release"),
        }
    }

    /// Pauses the collector and releases the backend for `step`. On an error
    /// nothing stays released.
    async fn release(self: &Arc<Self>, step: &str) -> Result<Released, (StatusCode, String)> {
        let backend = self
            .gate
            .begin_release(step)
            .map_err(|e| (StatusCode::CONFLICT, e))?;
        let held = Released {
            owner: self.clone(),
            backend: backend.clone(),
            restored: false,
        };
        let Some(b) = backend else {
            return Ok(held);
        };
        let me = self.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            me.flight
                .call("release", GPU_RELEASE_DEADLINE, move || b.release())
        })
        .await;
        let why = match outcome {
            Ok(Outcome::Done(Ok(()))) => return Ok(held),
            Ok(Outcome::Done(Err(e))) => e,
            Ok(Outcome::TimedOut) => format!(
                "the GPU backend was not released within {}s",
                GPU_RELEASE_DEADLINE.as_secs()
            ),
            Ok(Outcome::StillRunning { since }) => {
                format!("an earlier release is still stuck ({}s)", since.as_secs())
            }
            Err(e) => format!("release task failed: {e}"),
        };
        // `held` drops here: the backend is initialised again (a no-op when
        // it kept its handle) and the collector resumes.
        drop(held);
        Err((StatusCode::SERVICE_UNAVAILABLE, why))
    }

    /// Initialises the backend again and resumes the collector (blocking,
    /// bounded by [`GPU_REINIT_DEADLINE`]).
    fn restore(&self, backend: Option<Arc<dyn GpuBackend>>) -> Result<(), String> {
        let result = match backend {
            None => Ok(()),
            Some(b) => match self
                .flight
                .call("reinit", GPU_REINIT_DEADLINE, move || b.reinit())
            {
                Outcome::Done(r) => r,
                Outcome::TimedOut => Err(format!(
                    "not initialised again within {}s",
                    GPU_REINIT_DEADLINE.as_secs()
                )),
                Outcome::StillRunning { since } => Err(format!(
                    "an earlier re-init is still stuck ({}s)",
                    since.as_secs()
                )),
            },
        };
        // The collector resumes either way: a backend that failed to come
        // back is reported as a failing gpu collector, not as paused.
        self.gate.end_release();
        match &result {
            Ok(()) => tracing::info!("gpu backend initialised again, gpu collector resumed"),
            Err(e) => tracing::error!(error = %e, "gpu backend could not be initialised again"),
        }
        result
    }
}

/// The GPU released for one step: restored by [`Released::restore`], or when
/// dropped (on a thread of its own) if the request goes away first.
struct Released {
    owner: Arc<GpuRelease>,
    backend: Option<Arc<dyn GpuBackend>>,
    restored: bool,
}

impl Released {
    async fn restore(mut self) -> Result<(), String> {
        self.restored = true;
        let owner = self.owner.clone();
        let backend = self.backend.take();
        tokio::task::spawn_blocking(move || owner.restore(backend))
            .await
            .unwrap_or_else(|e| Err(format!("re-init task failed: {e}")))
    }
}

impl Drop for Released {
    fn drop(&mut self) {
        if self.restored {
            return;
        }
        let owner = self.owner.clone();
        let backend = self.backend.take();
        let spawned = std::thread::Builder::new()
            .name("gpuops-gpu-reinit".into())
            .spawn(move || owner.restore(backend));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the gpu re-init thread");
            self.owner.gate.end_release();
        }
    }
}

/// Everything `/v1/exec` needs.
pub struct ExecState<C: Clock = SystemClock> {
    pub verifier: ExecVerifier<C>,
    pub runbooks_dir: PathBuf,
    pub output_cap: usize,
    pub runner: Arc<dyn CommandRunner>,
    /// Where a step's binaries named by name are found.
    pub search_path: SearchPath,
    /// The procfs root the plan reads NVML holders from.
    pub procfs: PathBuf,
    slots: tokio::sync::Semaphore,
    gpu: Arc<GpuRelease>,
}

impl<C: Clock> ExecState<C> {
    pub fn new(
        verifier: ExecVerifier<C>,
        runbooks_dir: PathBuf,
        output_cap: usize,
        runner: Arc<dyn CommandRunner>,
    ) -> ExecState<C> {
        ExecState {
            verifier,
            runbooks_dir,
            output_cap,
            runner,
            search_path: SearchPath::default(),
            procfs: PathBuf::from("/proc"),
            slots: tokio::sync::Semaphore::new(MAX_CONCURRENT),
            gpu: Arc::new(GpuRelease::new(Arc::new(GpuGate::default()))),
        }
    }

    /// With the directories binaries are looked up in.
    pub fn with_search_path(mut self, path: SearchPath) -> ExecState<C> {
        self.search_path = path;
        self
    }

    /// With the procfs root NVML holders are listed from.
    pub fn with_procfs(mut self, procfs: PathBuf) -> ExecState<C> {
        self.procfs = procfs;
        self
    }

    /// Releases the GPU collector's backend behind `gate` for `releases_gpu`
    /// steps (the default gate has no backend: only the pause applies).
    pub fn with_gpu_gate(mut self, gate: Arc<GpuGate>) -> ExecState<C> {
        self.gpu = Arc::new(GpuRelease::new(gate));
        self
    }
}

/// The `/v1/exec` router for the agent's config and node name, or `None`
/// when no public key is configured (the route then does not exist: 404).
/// `gpu_gate` is the GPU collector's (`Context::gpu_gate`).
pub fn router(cfg: &ExecConfig, node: &str, gpu_gate: Arc<GpuGate>) -> Option<Router> {
    if cfg.public_keys.is_empty() {
        return None;
    }
    let state = ExecState::new(
        ExecVerifier::new(cfg.public_keys.clone(), node),
        cfg.runbooks_dir.clone(),
        cfg.output_cap_bytes,
        Arc::new(ProcessRunner),
    )
    .with_search_path(SearchPath::default_and(&cfg.path))
    .with_procfs(cfg.procfs.clone())
    .with_gpu_gate(gpu_gate);
    Some(router_with(Arc::new(state)))
}

/// The router over explicit state (tests inject a clock and a runner).
pub fn router_with<C: Clock + 'static>(state: Arc<ExecState<C>>) -> Router {
    Router::new()
        .route("/v1/exec", post(handle::<C>))
        .route("/v1/plan", post(plan::handle::<C>))
        .with_state(state)
}

/// A refusal, logged with its status and message (which never hold the secret).
fn refuse(status: StatusCode, message: impl Into<String>) -> Response {
    let message = message.into();
    tracing::warn!(status = status.as_u16(), error = %message, "exec request refused");
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

/// 401 with a generic body for an unauthenticated request (the reason goes
/// to the log only); 403 or 400 with the reason for an authentic request
/// that is not for this agent or is malformed.
fn unauthorized(reason: &ExecAuthError) -> Response {
    match reason {
        ExecAuthError::WrongNode { .. } | ExecAuthError::WrongPurpose { .. } => {
            return refuse(StatusCode::FORBIDDEN, reason.to_string());
        }
        ExecAuthError::BadBody(_) => return refuse(StatusCode::BAD_REQUEST, reason.to_string()),
        _ => {}
    }
    tracing::warn!(status = 401, reason = %reason, "exec request refused");
    (
        StatusCode::UNAUTHORIZED,
        Json(serde_json::json!({ "error": "unauthorized" })),
    )
        .into_response()
}

/// A signed request that passed every check up to its rendered argv.
pub(crate) struct Checked {
    pub req: SignedExec,
    pub runbook: Runbook,
    pub step: Step,
    pub params: Params,
    /// The argv rendered from this node's runbook file (names not resolved).
    pub argv: Vec<String>,
}

/// The checks `/v1/exec` and `/v1/plan` share, in order: signature header,
/// body size, signature, window, nonce and `purpose` (for `endpoint`), the
/// node, runbook, step, kind and target, parameters, a `node` parameter,
/// the rendered argv. `Err` is the refusal to send.
pub(crate) async fn check_request<C: Clock + 'static>(
    state: &ExecState<C>,
    headers: &HeaderMap,
    body: Body,
    endpoint: Purpose,
) -> Result<Checked, Response> {
    if let Err(e) = state.verifier.precheck(headers) {
        return Err(unauthorized(&e));
    }
    let bytes = match to_bytes(body, MAX_BODY_BYTES).await {
        Ok(b) => b,
        Err(_) => {
            return Err(refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("body larger than {MAX_BODY_BYTES} bytes"),
            ));
        }
    };
    let req = match state.verifier.verify_for(headers, &bytes, endpoint) {
        Ok(r) => r,
        Err(e) => return Err(unauthorized(&e)),
    };
    if !is_runbook_id(&req.runbook) {
        return Err(refuse(StatusCode::NOT_FOUND, "no such runbook"));
    }
    // Read off the async threads, with a deadline (the directory could be on
    // a slow disk); the file is read at each request so edits apply at once.
    let path = state.runbooks_dir.join(format!("{}.yaml", req.runbook));
    let read = tokio::task::spawn_blocking(move || {
        if path.is_file() {
            Some(load_file(&path))
        } else {
            None
        }
    });
    let loaded = match tokio::time::timeout(READ_DEADLINE, read).await {
        Ok(Ok(loaded)) => loaded,
        _ => {
            return Err(refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "cannot read the runbook directory in time",
            ))
        }
    };
    let runbook = match loaded {
        None => {
            return Err(refuse(
                StatusCode::NOT_FOUND,
                format!("no runbook {} on this node", req.runbook),
            ))
        }
        Some(Ok(rb)) => rb,
        Some(Err(e)) => {
            tracing::error!(runbook = %req.runbook, errors = %e, "runbook on this node is invalid");
            return Err(refuse(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("runbook {} on this node is invalid", req.runbook),
            ));
        }
    };
    let Some(step) = runbook.step(&req.step).cloned() else {
        return Err(refuse(
            StatusCode::NOT_FOUND,
            format!("runbook {} has no step {}", req.runbook, req.step),
        ));
    };
    if step.kind() != Kind::Command || step.target != StepTarget::Node {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            format!(
                "step {} is a {} step for the {}: the agent runs only node commands",
                step.name,
                step.kind().as_str(),
                step.target.as_str()
            ),
        ));
    }
    let labels = Default::default();
    let params = match runbook.resolve_params(&req.params, &labels) {
        Ok(p) => p,
        Err(e) => {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                format!("runbook {} step {}: {e}", req.runbook, req.step),
            ));
        }
    };
    if let Some(n) = req.params.get("node") {
        if n != state.verifier.node() {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                format!(
                    "parameter node={n:?} names another node; this is {:?}",
                    state.verifier.node()
                ),
            ));
        }
    }
    let argv = match engine::render(&step, &params) {
        Ok(Rendered::Command { argv }) => argv,
        Ok(_) => return Err(refuse(StatusCode::BAD_REQUEST, "not a command step")),
        Err(e) => return Err(refuse(StatusCode::BAD_REQUEST, e.to_string())),
    };
    Ok(Checked {
        req,
        runbook,
        step,
        params,
        argv,
    })
}

/// `argv` resolved on this node's search path (stat calls only, off the
/// async threads, within [`READ_DEADLINE`]): `Ok(Err(reason))` when it
/// cannot run here, `Err` when the lookup did not finish in time.
pub(crate) async fn resolve_here<C: Clock>(
    state: &ExecState<C>,
    argv: &[String],
) -> Result<Result<Vec<String>, String>, Response> {
    let path = state.search_path.clone();
    let node = state.verifier.node().to_string();
    let argv = argv.to_vec();
    let task = tokio::task::spawn_blocking(move || {
        resolve_argv(&argv, &path).map_err(|e| e.reason_on(&node))
    });
    match tokio::time::timeout(READ_DEADLINE, task).await {
        Ok(Ok(r)) => Ok(r),
        _ => Err(refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "cannot look up the step's binaries in time",
        )),
    }
}

/// An answer saying the step was not run: `what` is its missing
/// `only_if_exists` path or the reason its binary cannot run here.
fn not_run(what: String) -> Response {
    let mut resp = ExecResponse::from_output(&crate::runbook::exec::CommandOutput::default());
    resp.unavailable = Some(what);
    (StatusCode::OK, Json(resp)).into_response()
}

async fn handle<C: Clock + 'static>(
    State(state): State<Arc<ExecState<C>>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Checked {
        req,
        runbook,
        step,
        params,
        argv,
    } = match check_request(&state, &headers, body, Purpose::Exec).await {
        Ok(c) => c,
        Err(refused) => return refused,
    };
    let step = &step;
    // `only_if_exists` is checked here, on the node, so the bot learns
    // whether this member of an alternative group can run at all; then the
    // binaries are resolved as `/v1/plan` resolved them.
    if let Some(path) = &step.flow.only_if_exists {
        if !crate::host::path_exists(std::path::Path::new(path)) {
            tracing::info!(runbook = %runbook.id, step = %step.name, path = %path, "exec step not available on this node");
            return not_run(path.clone());
        }
    }
    let argv = match resolve_here(&state, &argv).await {
        Ok(Ok(resolved)) => resolved,
        Ok(Err(why)) => {
            tracing::info!(runbook = %runbook.id, step = %step.name, reason = %why, "exec step not available on this node");
            return not_run(why);
        }
        Err(refused) => return refused,
    };
    let digest = argv_digest(&argv);
    if digest != req.argv_sha256.to_ascii_lowercase() {
        return refuse(
            StatusCode::FORBIDDEN,
            format!(
                "runbook {} step {}: the signed command (sha256 {}) differs from what this node runs now: {} (sha256 {digest}); planned against another binary, or the bot and this node run different runbook versions?",
                req.runbook,
                req.step,
                req.argv_sha256,
                Rendered::Command { argv: argv.clone() }.display(),
            ),
        );
    }
    if step.needs_approval {
        if let Err(why) = crate::exec_auth::verify_approval(&req) {
            return refuse(StatusCode::FORBIDDEN, why);
        }
    }
    let approval_text = req
        .approval
        .as_ref()
        .map(|a| {
            format!(
                "run {} requested by {} approved by {} at {}",
                a.run, a.requested_by, a.approved_by, a.approved_at
            )
        })
        .unwrap_or_else(|| "none".into());
    let Ok(_permit) = state.slots.try_acquire() else {
        return refuse(
            StatusCode::TOO_MANY_REQUESTS,
            format!("{MAX_CONCURRENT} steps are already running"),
        );
    };
    let spec = CommandSpec {
        argv,
        timeout: step.timeout,
        output_cap: state.output_cap,
    };
    let params_text = format!("{:?}", params.as_map());
    let released = if step.releases_gpu {
        let what = format!("{}:{}", runbook.id, step.name);
        match state.gpu.release(&what).await {
            Ok(r) => {
                tracing::info!(runbook = %runbook.id, step = %step.name, "gpu released for the step, gpu collector paused");
                Some(r)
            }
            Err((status, why)) => {
                return refuse(
                    status,
                    format!(
                        "runbook {} step {}: cannot release the GPU: {why}",
                        runbook.id, step.name
                    ),
                );
            }
        }
    } else {
        None
    };
    let start = Instant::now();
    tracing::info!(
        runbook = %runbook.id,
        step = %step.name,
        params = %params_text,
        approval = %approval_text,
        nonce = %req.nonce,
        timeout_seconds = step.timeout.as_secs(),
        "exec step started"
    );
    let ran = state.runner.run(&spec).await;
    if let Some(r) = released {
        if let Err(e) = r.restore().await {
            tracing::error!(runbook = %runbook.id, step = %step.name, error = %e, "gpu not initialised again after the step");
        }
    }
    match ran {
        Ok(out) => {
            tracing::info!(
                runbook = %runbook.id,
                step = %step.name,
                params = %params_text,
                exit_code = %out
                    .exit_code
                    .map_or_else(|| "none".to_string(), |c| c.to_string()),
                timed_out = out.timed_out,
                truncated = out.truncated,
                duration_seconds = out.duration.as_secs_f64(),
                "exec step finished"
            );
            Json(ExecResponse::from_output(&out)).into_response()
        }
        Err(e) => {
            tracing::warn!(
                runbook = %runbook.id,
                step = %step.name,
                params = %params_text,
                error = %e,
                duration_seconds = start.elapsed().as_secs_f64(),
                "exec step could not start"
            );
            Json(ExecResponse::from_error(&e)).into_response()
        }
    }
}
