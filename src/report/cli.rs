//! `gpuops report preview` (write `report.md`, `report.html` and one PNG
//! per chart, post nothing) and `gpuops report send` (deliver the report to
//! its destinations now through an outbox of its own, with the bot's retry
//! policy and a deadline; what is still pending then goes to the bot's
//! outbox). The role wiring (`bot_role::report`) builds the notifiers.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::{DateTime, Utc};

use crate::bot::state::BotMetrics;
use crate::config::reports::ReportConfig;
use crate::config::BotConfig;
use crate::message::Message;
use crate::outbox::{Notifiers, Worker};
use crate::report::schedule::deliveries;
use crate::report::victims::{AgentEvents, OomEvents};
use crate::report::{build, Built, Inputs, Outcome};
use crate::store::outbox::Outbox;
use crate::store::reports::ReportDelivery;
use crate::store::Store;

/// The report named `name`, or an error listing the names there are.
pub fn find<'a>(cfg: &'a BotConfig, name: &str) -> anyhow::Result<&'a ReportConfig> {
    cfg.reports.iter().find(|r| r.name == name).ok_or_else(|| {
        let names: Vec<&str> = cfg.reports.iter().map(|r| r.name.as_str()).collect();
        anyhow::anyhow!(
            "no report named {name:?} in {} (configured: {})",
            cfg.source
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "the configuration".into()),
            if names.is_empty() {
                "none; add a [[reports]] entry".to_string()
            } else {
                names.join(", ")
            }
        )
    })
}

/// Parses `--at` (RFC 3339).
pub fn parse_at(s: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(s.trim())
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("{s:?} is not an RFC 3339 time like 2026-11-28T08:00:00+01:00 ({e})"))
}

/// Opens the bot's store if its file exists (a preview never creates one).
pub fn open_store_if_present(cfg: &BotConfig) -> Option<Store> {
    let path = &cfg.store.path;
    if !path.exists() {
        return None;
    }
    match Store::open_with(path, cfg.store.sync) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(store = %path.display(), error = %e, "cannot open the bot's store; the report says so");
            None
        }
    }
}

/// Computes the report ending at `at` (the store read if present).
pub async fn compute(
    cfg: &BotConfig,
    report: &ReportConfig,
    store: Option<&Store>,
    at: DateTime<Utc>,
) -> anyhow::Result<Built> {
    let prometheus = cfg
        .prometheus
        .as_ref()
        .context("reports need [prometheus] url")?;
    let agents = AgentEvents::from_config(cfg);
    let names = crate::inventory::Identity::from_config(cfg).names().await;
    Ok(build(Inputs {
        config: report,
        prometheus_url: &prometheus.url,
        store,
        at,
        late: false,
        agent_events: agents.as_ref().map(|a| a as &dyn OomEvents),
        names: &names,
        lifecycle: &cfg.lifecycle,
    })
    .await)
}

/// Writes a built report into `out`: `report.md`, `report.html` and its
/// charts. Returns the files written.
pub fn write_preview(built: &Built, out: &Path) -> anyhow::Result<Vec<std::path::PathBuf>> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut files = Vec::new();
    let mut write = |name: &str, bytes: &[u8]| -> anyhow::Result<()> {
        let p = out.join(name);
        std::fs::write(&p, bytes).with_context(|| format!("cannot write {}", p.display()))?;
        files.push(p);
        Ok(())
    };
    write("report.md", built.markdown.as_bytes())?;
    write("report.html", built.preview_html.as_bytes())?;
    for c in &built.message.charts {
        write(&c.file_name, &c.png)?;
    }
    Ok(files)
}

/// Exit status of `report preview` and `report send` when some section of
/// the report could not be computed (Prometheus or the store unreachable,
/// a query failing): the report still went out (or was written), and says
/// so in its headline, but it is not an all-clear.
pub const EXIT_NOT_COMPUTED: u8 = 3;
/// Exit status of `report send` when a destination did not get the report
/// (a dead letter, or still pending at `--timeout`); it takes precedence
/// over [`EXIT_NOT_COMPUTED`].
pub const EXIT_NOT_DELIVERED: u8 = 4;

/// The exit status of `report preview`: 0, or [`EXIT_NOT_COMPUTED`].
pub fn preview_exit_code(outcome: Outcome) -> u8 {
    match outcome {
        Outcome::Partial | Outcome::Failed => EXIT_NOT_COMPUTED,
        Outcome::Sent | Outcome::Empty => 0,
    }
}

/// The exit status of `report send`: 0 when every section was computed
/// and every destination got it; else [`EXIT_NOT_DELIVERED`] or
/// [`EXIT_NOT_COMPUTED`].
pub fn send_exit_code(outcome: Outcome, r: &SendResult) -> u8 {
    if !r.dead.is_empty() || r.pending > 0 {
        EXIT_NOT_DELIVERED
    } else {
        preview_exit_code(outcome)
    }
}

/// The report's headline when it could not see everything, for the
/// command's stderr (the first summary line, as plain text).
pub fn incomplete_headline(built: &Built) -> Option<String> {
    crate::report::render::incomplete_headline(&built.sections, &built.figures)
        .map(|l| crate::report::render::line_text(&l))
}

/// What `report send` ended in.
#[derive(Debug)]
pub struct SendResult {
    pub delivered: usize,
    /// `destination: error` per dead letter.
    pub dead: Vec<String>,
    /// Still pending at the deadline.
    pub pending: usize,
    /// Of those, handed to the bot's outbox.
    pub handed_to_bot: usize,
}

/// Delivers `built` to the report's destinations through an outbox of its
/// own (a private store in a temporary directory, so a bot running on the
/// same database neither sees these rows nor has its own delivered twice),
/// with the bot's retry policy, until each row is delivered or
/// dead-lettered, or `deadline` passes; rows still pending then are handed
/// to the bot's outbox (`store`), which delivers them when the bot runs.
pub async fn send(
    cfg: Arc<BotConfig>,
    report: &ReportConfig,
    store: Store,
    built: Built,
    notifiers: Notifiers,
    deadline: Duration,
) -> anyhow::Result<SendResult> {
    let message = Message::Report(Box::new(built.message));
    let rows = deliveries(report, &message);
    let dir = std::env::temp_dir().join(format!(
        "gpuops-report-send-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let db = dir.join("outbox.db");
    let private = tokio::task::spawn_blocking(move || Store::open(&db))
        .await
        .context("store task failed")?
        .context("cannot open a private outbox")?;
    let result = deliver(cfg, private.clone(), rows, notifiers, deadline).await;
    let handed = match &result {
        Ok(r) if r.pending > 0 => {
            let left: Vec<ReportDelivery> = private
                .due(f64::MAX, 1000)
                .await
                .context("cannot read the private outbox")?
                .into_iter()
                .filter_map(|row| {
                    Some(ReportDelivery {
                        destination: row.destination,
                        body: row.body?,
                    })
                })
                .collect();
            store
                .enqueue_report(left)
                .await
                .context("cannot hand the pending deliveries to the bot's outbox")?
                .len()
        }
        _ => 0,
    };
    drop(private);
    let _ = std::fs::remove_dir_all(&dir);
    let mut r = result?;
    r.handed_to_bot = handed;
    Ok(r)
}

async fn deliver(
    cfg: Arc<BotConfig>,
    store: Store,
    rows: Vec<ReportDelivery>,
    notifiers: Notifiers,
    deadline: Duration,
) -> anyhow::Result<SendResult> {
    let ids = store
        .enqueue_report(rows)
        .await
        .context("cannot enqueue the report")?;
    let outbox = Outbox::new(store.clone());
    let worker = Worker {
        store: store.clone(),
        outbox: outbox.clone(),
        notifiers,
        config: cfg,
        metrics: Arc::new(BotMetrics::new()),
        suggest_runbook: None,
        identity: None,
    };
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(async move {
        worker
            .run(async move {
                let _ = stop_rx.wait_for(|s| *s).await;
            })
            .await
    });
    outbox.wake();
    let t0 = Instant::now();
    let (pending, dead) = loop {
        let (pending, dead) = store
            .report_delivery_state(ids.clone())
            .await
            .context("cannot read the outbox")?;
        if pending == 0 || t0.elapsed() >= deadline {
            break (pending, dead);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    Ok(SendResult {
        delivered: ids.len() - pending - dead.len(),
        dead,
        pending,
        handed_to_bot: 0,
    })
}
