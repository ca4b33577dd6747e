//! The bot role's wiring: configuration, store, notifiers, outbox worker,
//! HTTP router, start-up self test, shutdown; `gpuops audit` and
//! `gpuops discord register`.
//!
//! The router builder ([`router_with`]) is public so the chat role can mount
//! `/slack/*` and `/discord/*` beside `/alertmanager`. Nothing below imports
//! this module; the shared state lives in `bot::state`. No message formatting
//! or SQL here.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tracing::Instrument as _;

use crate::alert;
use crate::bot::state::{BotMetrics, BotState};
use crate::cli::{AuditArgs, BotArgs, DiscordCommand, DiscordRegisterArgs};
use crate::config::BotConfig;
use crate::notify::console::ConsoleNotifier;
use crate::notify::discord::DiscordNotifier;
use crate::notify::email::EmailNotifier;
use crate::notify::pagerduty::PagerDutyNotifier;
use crate::notify::slack::SlackNotifier;
use crate::notify::webhook::WebhookNotifier;
use crate::notify::Notifier;
use crate::outbox::{Notifiers, Worker};
use crate::store::outbox::Outbox;
use crate::store::Store;
use crate::telemetry::{self, HttpMetrics};
use crate::web::shutdown_signal;

impl BotState {
    /// Builds the state and the outbox worker that goes with it (run the
    /// worker with [`Worker::run`]). Notifiers are built from the config.
    pub fn new(config: Arc<BotConfig>, store: Store) -> anyhow::Result<(Arc<BotState>, Worker)> {
        let notifiers = build_notifiers(&config)?;
        Ok(BotState::with_notifiers(config, store, notifiers))
    }

    /// As [`BotState::new`] with given notifiers (tests).
    pub fn with_notifiers(
        config: Arc<BotConfig>,
        store: Store,
        notifiers: Notifiers,
    ) -> (Arc<BotState>, Worker) {
        let outbox = Outbox::new(store.clone());
        let metrics = Arc::new(BotMetrics::new());
        let identity = Arc::new(crate::inventory::Identity::from_config(&config));
        let worker = Worker {
            store: store.clone(),
            outbox: outbox.clone(),
            notifiers,
            config: config.clone(),
            metrics: metrics.clone(),
            suggest_runbook: crate::chat::runbook_suggester(&config),
            identity: Some(identity.clone()),
        };
        let state = Arc::new(BotState {
            config,
            store,
            outbox,
            metrics,
            http: Arc::new(HttpMetrics::new()),
            identity,
        });
        (state, worker)
    }
}

/// The notifiers the config asks for.
pub fn build_notifiers(cfg: &BotConfig) -> anyhow::Result<Notifiers> {
    let timeout = cfg.delivery.timeout;
    let slack = match &cfg.slack {
        Some(s) => Some(
            Arc::new(SlackNotifier::new(s).context("cannot set up the Slack client")?)
                as Arc<dyn Notifier>,
        ),
        None => None,
    };
    let discord = match &cfg.discord {
        Some(d) => Some(Arc::new(
            DiscordNotifier::new(d, timeout).context("cannot set up the Discord client")?,
        ) as Arc<dyn Notifier>),
        None => None,
    };
    let webhook = WebhookNotifier::new(&cfg.routing, timeout)
        .context("cannot set up the webhook client")?
        .map(|w| Arc::new(w) as Arc<dyn Notifier>);
    let pagerduty = PagerDutyNotifier::new(&cfg.routing, &cfg.pagerduty.api_url, timeout)
        .context("cannot set up the PagerDuty client")?
        .map(|n| Arc::new(n) as Arc<dyn Notifier>);
    let email = match &cfg.email {
        Some(e) => Some(Arc::new(
            EmailNotifier::new(e, timeout).context("cannot set up the SMTP client")?,
        ) as Arc<dyn Notifier>),
        None => None,
    };
    Ok(Notifiers {
        slack,
        discord,
        webhook,
        console: Arc::new(ConsoleNotifier::new()),
        pagerduty,
        email,
    })
}

/// The bot's router: `/alertmanager`, `/healthz`, `/metrics`, `/`.
pub fn router(state: Arc<BotState>) -> Router {
    router_with(state, Router::new())
}

/// The bot's router with `extra` routes (e.g. the chat role's `/slack/*`,
/// `/discord/*`) merged in, all under the same RED metrics and request-id
/// middleware.
pub fn router_with(state: Arc<BotState>, extra: Router) -> Router {
    let http = state.http.clone();
    let max = state.config.server.max_body_bytes;
    Router::new()
        .route(
            "/alertmanager",
            post(alert::receive).layer(DefaultBodyLimit::max(max)),
        )
        .route(
            "/pagerduty/webhook",
            post(crate::paging::webhook::receive).layer(DefaultBodyLimit::max(1024 * 1024)),
        )
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/", get(index))
        .with_state(state)
        .merge(extra)
        .layer(axum::middleware::from_fn(trace_request))
        .layer(axum::middleware::from_fn_with_state(
            http,
            telemetry::track_http,
        ))
}

/// Gives every request a span with a `trace_id` (from `X-Request-Id` or new).
async fn trace_request(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 64
                && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
        .map(str::to_string)
        .unwrap_or_else(|| format!("{:016x}", rand::random::<u64>()));
    let span = tracing::info_span!("request", trace_id = %id);
    next.run(req).instrument(span).await
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// Readiness: 200 when the store answers (so this replica can acknowledge
/// webhooks), 503 otherwise; a load balancer sends traffic elsewhere.
async fn readyz(State(state): State<Arc<BotState>>) -> Response {
    let ping = tokio::time::timeout(Duration::from_secs(2), state.store.ping()).await;
    match ping {
        Ok(Ok(())) => (axum::http::StatusCode::OK, "ready\n").into_response(),
        Ok(Err(e)) => (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            format!("storage unavailable: {e}\n"),
        )
            .into_response(),
        Err(_) => (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "storage unavailable: no answer within 2s\n",
        )
            .into_response(),
    }
}

async fn index() -> &'static str {
    "gpuops bot\nPOST /alertmanager  AlertManager webhook (version 4)\n/metrics  Prometheus metrics\n/healthz  liveness\n/readyz   readiness (the store answers)\n"
}

async fn metrics(State(state): State<Arc<BotState>>) -> Response {
    if let Ok(n) = state.store.pending().await {
        state.metrics.outbox_pending.set(n);
    }
    crate::lifecycle::export(&state.store, &state.metrics).await;
    let mut families = telemetry::process_families();
    families.extend(state.http.gather());
    families.extend(state.metrics.gather());
    families.sort_by(|a, b| a.name().cmp(b.name()));
    let mut buf = telemetry::build_info("bot", "none");
    match prometheus::TextEncoder::new().encode_utf8(&families, &mut buf) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            buf,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "cannot encode metrics");
            (StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics\n").into_response()
        }
    }
}

/// `gpuops bot`.
pub fn run(args: BotArgs) -> anyhow::Result<ExitCode> {
    let mut cfg = match &args.config {
        Some(path) => BotConfig::from_file(path)?,
        None => BotConfig::default(),
    };
    if let Some(l) = args.listen {
        cfg.server.listen = l;
        if let Some(why) = cfg.server.unauthenticated_public_listener() {
            let file = match &cfg.source {
                Some(p) => p.display().to_string(),
                None => "no configuration file (--config)".to_string(),
            };
            anyhow::bail!("--listen {l} refused ({file}): {why}");
        }
    }
    if let Some(f) = &args.log_format {
        cfg.log.json = f == "json";
    }
    telemetry::init("gpuops-bot", cfg.log.json, &cfg.log.level);
    crate::web::raise_open_file_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(16)
        .thread_name("gpuops-bot")
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(serve(Arc::new(cfg)))?;
    Ok(ExitCode::SUCCESS)
}

/// Runs the bot until SIGINT/SIGTERM.
pub async fn serve(cfg: Arc<BotConfig>) -> anyhow::Result<()> {
    let store = Store::open_config(&cfg.store)
        .await
        .context("cannot open the store")?;
    let (state, worker) = BotState::new(cfg.clone(), store.clone())?;
    let listener = crate::web::bind(cfg.server.listen)
        .with_context(|| format!("cannot listen on {}", cfg.server.listen))?;
    let local = listener.local_addr().unwrap_or(cfg.server.listen);
    let destinations: Vec<String> = cfg
        .routing
        .destinations
        .iter()
        .flat_map(|d| d.targets())
        .map(|t| t.key())
        .collect();
    tracing::info!(
        listen = %local,
        store = %store.describe(),
        config = %cfg.source.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "none".into()),
        destinations = %destinations.join(","),
        webhook_auth = cfg.server.webhook_token.is_some(),
        "listening for AlertManager webhooks at POST /alertmanager"
    );

    for w in cfg.warnings() {
        tracing::warn!(warning = %w, "configuration");
    }
    {
        let cfg = cfg.clone();
        tokio::spawn(async move {
            if let Some(w) = crate::inventory::job_warning(&cfg).await {
                tracing::warn!(warning = %w, "configuration");
            }
        });
    }

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut worker_stop = stop_rx.clone();
    let worker_task = tokio::spawn(async move {
        worker
            .run(async move {
                let _ = worker_stop.wait_for(|s| *s).await;
            })
            .await
    });
    if let Some(pg) = store.pg() {
        let outbox = state.outbox.clone();
        pg.spawn_listener(Arc::new(move || outbox.wake()), stop_rx.clone());
    }
    spawn_pruner(state.clone(), stop_rx.clone());
    crate::paging::spawn(state.clone(), stop_rx.clone());
    crate::report::schedule::spawn(state.clone(), stop_rx.clone());
    // Reminders, and the nodes found out by their scheduler.
    crate::found::spawn(state.clone(), stop_rx.clone());

    if cfg.source.is_none() {
        tracing::info!(
            "no configuration given (--config): alerts are printed to this log; posting a test alert through the whole pipeline"
        );
        let hook = alert::test_webhook();
        let raw = serde_json::to_string(&hook).unwrap_or_default();
        if let Err(e) = alert::ingest(&state, raw, &hook).await {
            tracing::error!(error = %e, "cannot store the test alert");
        }
    }

    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    let chat = crate::chat::ChatState::new(state.clone());
    let app = router_with(
        state.clone(),
        crate::chat::start(chat, stop_rx.clone()).await,
    );
    let limits = cfg.server.limits.clone();
    crate::web::serve(
        listener,
        app,
        limits,
        state.http.clone(),
        None,
        shutdown_signal(),
    )
    .await
    .context("http server failed")?;
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), worker_task).await;
    if let Some(pg) = store.pg() {
        match pg.release_mine().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(rows = n, "handed back unfinished deliveries"),
            Err(e) => {
                tracing::warn!(error = %e, "cannot hand back deliveries; their leases will expire")
            }
        }
    }
    tracing::info!("bot stopped");
    Ok(())
}

fn spawn_pruner(state: Arc<BotState>, mut stop: tokio::sync::watch::Receiver<bool>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(3600));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            match state
                .store
                .prune(state.config.store.webhook_retention)
                .await
            {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(deleted = n, "pruned old webhooks and long-resolved groups")
                }
                Err(e) => tracing::warn!(error = %e, "cannot prune old webhooks"),
            }
        }
    });
}

/// `gpuops status --config FILE [NODE]`: exit 0 with the open groups (or
/// the node's), 1 when the store cannot be read, 2 for a node it cannot map.
pub fn status(args: crate::cli::StatusArgs) -> anyhow::Result<ExitCode> {
    let cfg = BotConfig::from_file(&args.config)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let groups = rt.block_on(async {
        let store = open_store_for_cli(&cfg).await?;
        store
            .firing_groups(500)
            .await
            .context("cannot read the open alert groups (this is not an all-clear)")
    })?;
    let names = crate::inventory::NodeNames::from_config(&cfg);
    use std::io::Write as _;
    match crate::chat::timeline::status_text(groups, &cfg.routing, &names, args.node.as_deref()) {
        Ok(text) => {
            writeln!(std::io::stdout().lock(), "{text}").context("cannot write to stdout")?;
            Ok(ExitCode::SUCCESS)
        }
        Err(unknown) => {
            eprintln!("gpuops: {unknown}");
            Ok(ExitCode::from(2))
        }
    }
}

/// `gpuops nodes`: the nodes out of service (read-only, like `status`).
pub fn nodes(args: crate::cli::NodesArgs) -> anyhow::Result<ExitCode> {
    let cfg = BotConfig::from_file(&args.config)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let rows = rt.block_on(async {
        let store = open_store_for_cli(&cfg).await?;
        store
            .node_states()
            .await
            .context("cannot read the node states (this is not an all-clear)")
    })?;
    let text = crate::lifecycle::nodes_text(&rows, crate::store::now());
    use std::io::Write as _;
    writeln!(std::io::stdout().lock(), "{text}").context("cannot write to stdout")?;
    Ok(ExitCode::SUCCESS)
}

/// The bot's store for a CLI command (SQLite must exist already).
async fn open_store_for_cli(cfg: &BotConfig) -> anyhow::Result<Store> {
    if cfg.store.url.is_some() {
        return Ok(Store::open_config(&cfg.store).await?);
    }
    let path = &cfg.store.path;
    if !path.exists() {
        anyhow::bail!(
            "no bot store at {} (set [store] path in the config)",
            path.display()
        );
    }
    Ok(Store::open(path)?)
}

/// `gpuops audit --config FILE [--since DURATION | --run ID | --group ID --markdown]`.
pub fn audit(args: AuditArgs) -> anyhow::Result<ExitCode> {
    let cfg = match &args.config {
        Some(path) => BotConfig::from_file(path)?,
        None => BotConfig::default(),
    };
    let store = if cfg.store.url.is_some() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?;
        rt.block_on(Store::open_config(&cfg.store))?
    } else {
        let path = &cfg.store.path;
        if !path.exists() {
            anyhow::bail!(
                "no bot store at {} (set [store] path in the config)",
                path.display()
            );
        }
        Store::open(path)?
    };
    let path = store.describe();
    // Nodes by the names `[[agents.nodes]]` gives them (no discovery here).
    let names = crate::inventory::NodeNames::from_config(&cfg);
    use std::io::Write as _;
    if let Some(run) = &args.run {
        let Some(text) = crate::chat::timeline::run_report_named(&store, run, &names)? else {
            anyhow::bail!("no run {run} in {path}");
        };
        std::io::stdout()
            .lock()
            .write_all(text.as_bytes())
            .context("cannot write to stdout")?;
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(group) = args.group {
        let Some(text) = crate::chat::timeline::group_markdown_named(&store, group, &names)? else {
            anyhow::bail!("no alert group {group} in {path}");
        };
        std::io::stdout()
            .lock()
            .write_all(text.as_bytes())
            .context("cannot write to stdout")?;
        return Ok(ExitCode::SUCCESS);
    }
    let since = args
        .since
        .map(|d| crate::store::now() - d.as_secs_f64())
        .unwrap_or(0.0);
    let records = store.audit_since_blocking(since)?;
    let mut out = std::io::stdout().lock();
    for r in &records {
        let at = chrono::DateTime::from_timestamp(r.at as i64, 0)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            .unwrap_or_else(|| r.at.to_string());
        writeln!(
            out,
            "{at}  {:<20} {:<16} {:<10} target={} params={}",
            r.who,
            r.action,
            r.outcome,
            r.target.as_deref().unwrap_or("-"),
            r.params
        )
        .context("cannot write to stdout")?;
    }
    if records.is_empty() {
        eprintln!(
            "no audit records{}",
            if args.since.is_some() {
                " in that window"
            } else {
                ""
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `gpuops discord …`.
pub fn discord(cmd: DiscordCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        DiscordCommand::Register(args) => discord_register(args),
    }
}

/// `gpuops discord register`: puts the chat's slash commands
/// ([`crate::chat::discord::slash_commands`]) as the application's global
/// commands and prints what Discord registered.
fn discord_register(args: DiscordRegisterArgs) -> anyhow::Result<ExitCode> {
    let cfg = BotConfig::from_file(&args.config)?;
    let file = args.config.display();
    let Some(discord) = &cfg.discord else {
        anyhow::bail!("{file} has no [discord] section");
    };
    let Some(application_id) = discord.application_id else {
        anyhow::bail!(
            "[discord] application_id is not set in {file} (the Discord developer portal: \
             General Information, Application ID)"
        );
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let registered = rt.block_on(crate::notify::discord::set_global_commands(
        discord,
        application_id,
        crate::chat::discord::slash_commands(),
        cfg.delivery.timeout,
    ))?;
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "registered {} global command(s) for Discord application {application_id}:",
        registered.len()
    )
    .context("cannot write to stdout")?;
    for c in &registered {
        writeln!(out, "  /{} (id {}): {}", c.name, c.id, c.description)
            .context("cannot write to stdout")?;
        for o in &c.options {
            writeln!(
                out,
                "    {}: {}, {}: {}",
                o.name,
                format!("{:?}", o.kind).to_lowercase(),
                if o.required { "required" } else { "optional" },
                o.description
            )
            .context("cannot write to stdout")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `gpuops report preview|send`.
pub fn report(cmd: crate::cli::ReportCommand) -> anyhow::Result<ExitCode> {
    use crate::cli::ReportCommand;
    let args = match &cmd {
        ReportCommand::Preview(a) => &a.report,
        ReportCommand::Send(a) => &a.report,
    };
    let cfg = Arc::new(BotConfig::from_file(&args.config)?);
    telemetry::init("gpuops-report", cfg.log.json, &cfg.log.level);
    let report = crate::report::cli::find(&cfg, &args.name)?.clone();
    let at = match &args.at {
        Some(s) => crate::report::cli::parse_at(s).map_err(|e| anyhow::anyhow!("--at: {e}"))?,
        None => chrono::Utc::now(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        match cmd {
            ReportCommand::Preview(a) => {
                let store = crate::report::cli::open_store_if_present(&cfg);
                let built = crate::report::cli::compute(&cfg, &report, store.as_ref(), at).await?;
                let files = crate::report::cli::write_preview(&built, &a.out)?;
                for f in &files {
                    println!("{}", f.display());
                }
                for f in &built.failures {
                    eprintln!("gpuops: could not compute {f}");
                }
                if let Some(h) = crate::report::cli::incomplete_headline(&built) {
                    eprintln!("gpuops: {h}");
                }
                eprintln!(
                    "{}: {} findings, outcome {}",
                    built.message.title,
                    built.findings,
                    built.outcome.as_str()
                );
                Ok(ExitCode::from(crate::report::cli::preview_exit_code(
                    built.outcome,
                )))
            }
            ReportCommand::Send(a) => {
                let (path, sync) = (cfg.store.path.clone(), cfg.store.sync);
                let store = tokio::task::spawn_blocking(move || Store::open_with(&path, sync))
                    .await
                    .context("store task failed")??;
                let built = crate::report::cli::compute(&cfg, &report, Some(&store), at).await?;
                for f in &built.failures {
                    eprintln!("gpuops: could not compute {f}");
                }
                if let Some(h) = crate::report::cli::incomplete_headline(&built) {
                    eprintln!("gpuops: {h}");
                }
                let outcome = built.outcome;
                let notifiers = build_notifiers(&cfg)?;
                let r = crate::report::cli::send(
                    cfg.clone(),
                    &report,
                    store,
                    built,
                    notifiers,
                    a.timeout,
                )
                .await?;
                eprintln!(
                    "report {:?}: {} delivered, {} dead-lettered, {} still pending{}",
                    report.name,
                    r.delivered,
                    r.dead.len(),
                    r.pending,
                    if r.handed_to_bot > 0 {
                        format!(" ({} handed to the bot's outbox)", r.handed_to_bot)
                    } else {
                        String::new()
                    }
                );
                for d in &r.dead {
                    eprintln!("gpuops: dead letter: {d}");
                }
                Ok(ExitCode::from(crate::report::cli::send_exit_code(
                    outcome, &r,
                )))
            }
        }
    })
}
