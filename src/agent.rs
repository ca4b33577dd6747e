//! The agent role's wiring: configuration, kernel-log watcher, collectors,
//! HTTP server, systemd notification and shutdown. No collection logic here.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

use crate::cli::{AgentArgs, CheckConfigArgs, CollectArgs, HostArgs};
use crate::collector::{self, kmsg, Context, KernelEvents, Runner};
use crate::config::agent::{ExecConfig, GpuBackendChoice};
use crate::config::AgentConfig;
#[cfg(feature = "bot")]
use crate::config::BotConfig;
use crate::exporter::{self, AgentState};
use crate::telemetry::{self, HttpMetrics};

/// Builds the configuration: the file (if any), then command-line overrides.
pub fn load_config(host: &HostArgs) -> anyhow::Result<AgentConfig> {
    let mut cfg = match &host.config {
        Some(path) => AgentConfig::from_file(path)?,
        None => AgentConfig::default(),
    };
    let roots = &mut cfg.roots;
    for (flag, slot) in [
        (&host.procfs, &mut roots.procfs),
        (&host.sysfs, &mut roots.sysfs),
        (&host.rootfs, &mut roots.rootfs),
        (&host.kmsg, &mut roots.kmsg),
    ] {
        if let Some(p) = flag {
            *slot = p.clone();
        }
    }
    if let Some(f) = &host.gpu_fake {
        cfg.gpu.backend = GpuBackendChoice::Fake(f.clone());
    }
    Ok(cfg)
}

/// `gpuops agent`.
pub fn run(args: AgentArgs) -> anyhow::Result<ExitCode> {
    let mut cfg = load_config(&args.host)?;
    if let Some(l) = args.listen {
        cfg.listen = l;
    }
    if let Some(f) = &args.log_format {
        cfg.log.json = f == "json";
    }
    for f in &args.exec_public_keys {
        let key = crate::exec_auth::ExecPublicKey::from_file(f)
            .map_err(|e| anyhow::anyhow!("--exec-public-key: {e}"))?;
        cfg.exec.public_keys.push(key);
        cfg.exec.public_key_files.push(f.clone());
    }
    if let Some(n) = &args.node_name {
        if !crate::exec_auth::is_node_name(n) {
            anyhow::bail!("--node-name: {n:?} is not a host name");
        }
        cfg.node_name = n.clone();
    }
    if let Some(d) = &args.runbooks {
        cfg.exec.runbooks_dir = d.clone();
    }
    if let Some(f) = &args.web_config_file {
        cfg.web_config_file = Some(f.clone());
    }
    telemetry::init("gpuops-agent", cfg.log.json, &cfg.log.level);
    crate::web::raise_open_file_limit();
    // Two workers, not one: with one, a scrape's connection under a flood
    // of idle ones (`web_load::idle_connections_under_a_hard_1024_fd_limit_
    // do_not_starve_metrics`) was reset in 2 of 5 runs (probably its request
    // not yet read while the lone worker served the flood); with two, 0 of 6. A
    // scrape on a kept-alive connection still runs where its bytes arrive:
    // host collectors on the worker, NVML and statvfs that may wait on a
    // server on the blocking pool (`Runner::may_block`), as bcrypt and
    // exec's own file work. Few threads, too: each one that allocates gets
    // a malloc arena of its own (anonymous memory that stays); a blocking
    // thread waits long enough for the next scrape, so a scrape reuses a
    // warm thread instead of starting one each time.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(8)
        .thread_keep_alive(BLOCKING_KEEP_ALIVE)
        .thread_name("gpuops-agent")
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(serve(Arc::new(cfg)))?;
    Ok(ExitCode::SUCCESS)
}

/// How long an idle blocking-pool thread waits for work: longer than the
/// common scrape intervals (15 s to 60 s).
const BLOCKING_KEEP_ALIVE: Duration = Duration::from_secs(120);

async fn serve(cfg: Arc<AgentConfig>) -> anyhow::Result<()> {
    let web_config = match &cfg.web_config_file {
        Some(f) => Some(
            crate::web::webconfig::WebConfigSource::open(f)
                .map_err(|e| anyhow::anyhow!("web configuration: {e}"))?,
        ),
        None => None,
    };
    let events = Arc::new(KernelEvents::new());
    kmsg::spawn_watcher(cfg.roots.clone(), events.clone());
    let ctx = Arc::new(Context::new(cfg.clone(), events.clone(), true));
    let collectors = collector::all(&ctx);
    if cfg.node_state.slurm {
        spawn_slurm_sampler(&cfg, ctx.scheduler.clone());
    }
    if ctx.pod_resources.is_on() {
        crate::kubelet::spawn_refresher(cfg.kubernetes.clone(), ctx.pod_resources.clone());
    }
    let gpu_gate = ctx.gpu_gate.clone();
    let runner = Arc::new(Runner::new(ctx, collectors));
    let state = Arc::new(AgentState {
        runner: runner.clone(),
        events,
        http: Arc::new(HttpMetrics::new()),
    });
    let mut app = exporter::router(state.clone());
    let untrusted = exec_sources_others_can_change(&cfg.exec);
    for problem in &untrusted {
        tracing::warn!(problem = %problem, "exec endpoint stays off");
    }
    let exec = if untrusted.is_empty() {
        crate::runbook::agent_exec::router(&cfg.exec, &cfg.node_name, gpu_gate)
    } else {
        None
    };
    if let Some(exec) = exec {
        tracing::info!(
            runbooks = %cfg.exec.runbooks_dir.display(),
            node = %cfg.node_name,
            keys = %cfg
                .exec
                .public_keys
                .iter()
                .map(|k| k.id())
                .collect::<Vec<_>>()
                .join(","),
            "exec endpoint enabled"
        );
        app = app.merge(exec.layer(axum::middleware::from_fn_with_state(
            state.http.clone(),
            telemetry::track_http,
        )));
    }
    let tls = web_config.as_ref().and_then(|w| w.tls_source());
    if let Some(w) = &web_config {
        let auth = crate::web::auth::BasicAuth::new(w.clone(), state.http.clone());
        app = app.layer(axum::middleware::from_fn_with_state(
            auth,
            crate::web::auth::require,
        ));
    }
    let listener =
        crate::web::bind(cfg.listen).with_context(|| format!("cannot listen on {}", cfg.listen))?;
    let local = listener.local_addr().unwrap_or(cfg.listen);
    tracing::info!(
        listen = %local,
        tls = tls.is_some(),
        basic_auth = web_config.as_ref().is_some_and(|w| !w.current().users.is_empty()),
        max_connections = cfg.web.max_connections,
        exec = !cfg.exec.public_keys.is_empty(),
        node = %cfg.node_name,
        procfs = %cfg.roots.procfs.display(),
        sysfs = %cfg.roots.sysfs.display(),
        "agent listening"
    );

    // First collection in the background: /readyz turns 200 when it is done.
    let first = runner.clone();
    tokio::task::spawn_blocking(move || {
        first.collect();
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
        tracing::info!("first collection done, ready");
    });
    spawn_watchdog(runner);

    let http = state.http.clone();
    crate::web::serve(
        listener,
        app,
        cfg.web.clone(),
        http,
        tls,
        crate::web::shutdown_signal(),
    )
    .await
    .context("http server failed")?;
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    tracing::info!("agent stopped");
    Ok(())
}

/// What makes the exec endpoint untrustworthy: a bot public key file, or the
/// runbook directory or one of its files, that any user may change (they
/// could sign or write the steps the agent runs as its own user). Empty when
/// exec is off anyway (no keys) or everything is safe.
pub fn exec_sources_others_can_change(exec: &ExecConfig) -> Vec<String> {
    use crate::secret::writable_by_others;
    if exec.public_keys.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut check = |path: &std::path::Path, what: &str| {
        if let Some(mode) = writable_by_others(path) {
            out.push(format!(
                "{what} {} is writable by any user (mode {mode:04o}): chmod o-w it",
                path.display()
            ));
        }
    };
    for f in &exec.public_key_files {
        check(f, "exec public key");
        if let Some(dir) = f.parent().filter(|d| !d.as_os_str().is_empty()) {
            check(dir, "the directory of exec public key");
        }
    }
    check(&exec.runbooks_dir, "runbook directory");
    if let Ok(entries) = std::fs::read_dir(&exec.runbooks_dir) {
        for e in entries.flatten() {
            check(&e.path(), "runbook");
        }
    }
    out
}

/// `[node_state] slurm`: runs `scontrol show node <node> --oneliner`
/// (resolved like a runbook step's binary: the default search path, then
/// `[exec] path`) through the runbook executor's runner, with a deadline,
/// every [`collector::node_state::SAMPLE_EVERY`], off the scrape path; the
/// `node_state` collector exports the latest reading.
fn spawn_slurm_sampler(cfg: &AgentConfig, latest: Arc<collector::node_state::Latest>) {
    use crate::runbook::exec::{resolve, CommandRunner as _, CommandSpec, ProcessRunner};
    let argv = vec![
        "scontrol".to_string(),
        "show".into(),
        "node".into(),
        cfg.node_name.clone(),
        "--oneliner".into(),
    ];
    let path = resolve::SearchPath::default_and(&cfg.exec.path);
    // The binary found on the search path, unless any user could replace it
    // (the agent runs it); stat calls, so off the async threads and bounded.
    let find = move |argv: Vec<String>, path: resolve::SearchPath| -> Result<Vec<String>, String> {
        let resolved = resolve::resolve_argv(&argv, &path).map_err(|e| e.to_string())?;
        let bin = std::path::Path::new(resolved.first().map(String::as_str).unwrap_or_default());
        match std::iter::once(bin)
            .chain(bin.parent())
            .find(|p| crate::secret::writable_by_others(p).is_some())
        {
            Some(p) => Err(format!("{} is writable by any user: not run", p.display())),
            None => Ok(resolved),
        }
    };
    // One lookup at a time: one stuck on a dead mount is not started again.
    let flight = Arc::new(crate::deadline::SingleFlight::new("gpuops-slurm-lookup"));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(collector::node_state::SAMPLE_EVERY);
        loop {
            tick.tick().await;
            let (a, p, f) = (argv.clone(), path.clone(), flight.clone());
            let looked_up = tokio::task::spawn_blocking(move || {
                f.call(
                    "scontrol",
                    collector::node_state::SAMPLE_TIMEOUT,
                    move || find(a, p),
                )
            })
            .await;
            let found = match looked_up {
                Ok(crate::deadline::Outcome::Done(r)) => r,
                Ok(_) => Err("scontrol could not be looked up in time".into()),
                Err(e) => Err(format!("lookup task failed: {e}")),
            };
            let reading = match found {
                Err(e) => Err(e),
                Ok(resolved) => {
                    let spec = CommandSpec {
                        argv: resolved,
                        timeout: collector::node_state::SAMPLE_TIMEOUT,
                        output_cap: 64 * 1024,
                    };
                    match ProcessRunner.run(&spec).await {
                        Err(e) => Err(e.to_string()),
                        Ok(out) if out.timed_out => Err(format!(
                            "scontrol timed out after {}s",
                            collector::node_state::SAMPLE_TIMEOUT.as_secs()
                        )),
                        Ok(out) if out.exit_code != Some(0) => Err(format!(
                            "scontrol exited with {:?}: {}",
                            out.exit_code,
                            out.stderr.trim().chars().take(200).collect::<String>()
                        )),
                        Ok(out) => collector::node_state::parse_scontrol(&out.stdout),
                    }
                }
            };
            if let Err(e) = &reading {
                tracing::warn!(error = %e, "cannot read this node's Slurm state");
            }
            latest.set(reading);
        }
    });
}

/// Pings systemd's watchdog at half its interval while the runtime and the
/// collector runner respond.
fn spawn_watchdog(runner: Arc<Runner>) {
    let mut usec = 0u64;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return;
    }
    let period = Duration::from_micros(usec / 2);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            if runner.is_ready() {
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
            }
        }
    });
}

/// `gpuops collect --once`: one exposition on stdout, exit 0 even if collectors fail.
pub fn collect_once(args: CollectArgs) -> anyhow::Result<ExitCode> {
    let cfg = Arc::new(load_config(&args.host)?);
    telemetry::init("gpuops-agent", cfg.log.json, "warn");
    let events = Arc::new(KernelEvents::new());
    kmsg::read_once(&cfg.roots, &events);
    let ctx = Arc::new(Context::new(cfg.clone(), events, false));
    if ctx.pod_resources.is_on() {
        // One List (with its deadline) before the one collection.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?;
        ctx.pod_resources
            .store(rt.block_on(crate::kubelet::list(&cfg.kubernetes)));
    }
    let collectors = collector::all(&ctx);
    let runner = Runner::new(ctx, collectors);
    let collected = runner.collect();
    let text = exporter::render_with_self_metrics(&runner, &collected, None);
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .context("cannot write to stdout")?;
    Ok(ExitCode::SUCCESS)
}

/// `gpuops check-config --agent FILE --bot FILE`.
pub fn check_config(args: CheckConfigArgs) -> anyhow::Result<ExitCode> {
    let mut ok = true;
    let mut web_ok = true;
    let mut report = |kind: &str,
                      path: &PathBuf,
                      result: Result<(), crate::config::ConfigErrors>| {
        match result {
            Ok(()) => println!("{}: ok ({kind} configuration)", path.display()),
            Err(e) => {
                ok = false;
                let n = e.0.len();
                eprintln!("{e}");
                eprintln!(
                    "{}: {n} error{}",
                    path.display(),
                    if n == 1 { "" } else { "s" }
                );
            }
        }
    };
    if let Some(p) = &args.agent {
        let parsed = AgentConfig::from_file(p);
        let web = parsed.as_ref().ok().and_then(|c| c.web_config_file.clone());
        if let Ok(c) = &parsed {
            for problem in exec_sources_others_can_change(&c.exec) {
                eprintln!(
                    "{}: warning: the exec endpoint stays off: {problem}",
                    p.display()
                );
            }
        }
        report("agent", p, parsed.map(|_| ()));
        if let Some(w) = web {
            match crate::web::webconfig::WebConfigSource::open(&w) {
                Ok(_) => println!("{}: ok (web configuration)", w.display()),
                Err(e) => {
                    eprintln!("{e}");
                    web_ok = false;
                }
            }
        }
    }
    #[cfg(feature = "bot")]
    if let Some(p) = &args.bot {
        let parsed = BotConfig::from_file(p);
        if let Ok(c) = &parsed {
            let mut warnings = c.warnings();
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                warnings.extend(rt.block_on(crate::inventory::job_warning(c)));
            }
            for w in warnings {
                eprintln!("{}: warning: {w}", p.display());
            }
        }
        report("bot", p, parsed.map(|_| ()));
    }
    Ok(if ok && web_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::exec_sources_others_can_change;
    use crate::config::agent::ExecConfig;
    use crate::exec_auth::ExecSigner;

    #[test]
    fn exec_stays_off_with_a_world_writable_key_or_runbook_directory() {
        let dir = tempfile::tempdir().unwrap();
        let public = dir.path().join("exec.pub");
        let signer = ExecSigner::generate();
        std::fs::write(&public, signer.public_key().to_pem().unwrap()).unwrap();
        std::fs::set_permissions(&public, std::fs::Permissions::from_mode(0o644)).unwrap();
        let runbooks = dir.path().join("runbooks");
        std::fs::create_dir(&runbooks).unwrap();
        std::fs::write(runbooks.join("r.yaml"), "id: r\n").unwrap();
        std::fs::set_permissions(&runbooks, std::fs::Permissions::from_mode(0o755)).unwrap();
        let exec = ExecConfig {
            public_keys: vec![signer.public_key()],
            public_key_files: vec![public.clone()],
            runbooks_dir: runbooks.clone(),
            output_cap_bytes: 1024,
            path: Vec::new(),
            procfs: "/proc".into(),
        };
        assert!(exec_sources_others_can_change(&exec).is_empty());
        std::fs::set_permissions(&public, std::fs::Permissions::from_mode(0o666)).unwrap();
        std::fs::set_permissions(&runbooks, std::fs::Permissions::from_mode(0o777)).unwrap();
        let problems = exec_sources_others_can_change(&exec);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("exec.pub") && problems[0].contains("0666"));
        assert!(problems[1].contains("runbook directory") && problems[1].contains("0777"));
        std::fs::set_permissions(&runbooks, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(
            runbooks.join("r.yaml"),
            std::fs::Permissions::from_mode(0o666),
        )
        .unwrap();
        assert_eq!(exec_sources_others_can_change(&exec).len(), 2);
    }
}
