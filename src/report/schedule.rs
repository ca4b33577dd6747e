//! The bot's report schedule: one task per `[[reports]]` entry, driven by
//! its cron expression in its time zone. Each slot is claimed in the store
//! in the same transaction that enqueues its deliveries, so a restart, a
//! `kill -9` or a second bot process never sends a slot twice; the latest
//! slot missed while the bot was down is sent once on start, marked late
//! (never a backlog). Counted in `gpuops_reports_total{name,outcome}` and
//! `gpuops_report_duration_seconds{name}`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::DateTime;
use tokio::sync::watch;

use crate::bot::state::BotState;
use crate::config::reports::ReportConfig;
use crate::message::Message;
use crate::report::victims::{AgentEvents, OomEvents};
use crate::report::{build, Inputs, Outcome};
use crate::store::reports::ReportDelivery;
use crate::store::{self, Store};

/// Starts one task per configured report.
pub fn spawn(state: Arc<BotState>, stop: watch::Receiver<bool>) {
    for r in &state.config.reports {
        tokio::spawn(report_loop(state.clone(), r.clone(), stop.clone()));
    }
}

/// The latest slot of `cfg` in `(after, now]`, if any.
pub fn due_slot(cfg: &ReportConfig, after: f64, now: f64) -> Option<f64> {
    crate::config::paging::latest_slot(&cfg.schedule, cfg.timezone, after, now)
}

/// The next slot after `now`.
pub fn next_slot(cfg: &ReportConfig, now: f64) -> Option<f64> {
    crate::config::paging::next_slot(&cfg.schedule, cfg.timezone, now)
}

/// The serialized deliveries of a built report (none when it is empty).
pub fn deliveries(cfg: &ReportConfig, message: &Message) -> Vec<ReportDelivery> {
    let body = serde_json::to_string(message).unwrap_or_default();
    cfg.targets()
        .into_iter()
        .map(|t| ReportDelivery {
            destination: t.key(),
            body: body.clone(),
        })
        .collect()
}

/// One pass at time `now`: send the latest slot that is due and not yet
/// claimed; a slot before `started` (missed while the bot was down) is
/// marked late. The first start records a baseline instead (nothing before
/// it is owed). Returns the slot and its outcome when this process claimed
/// one.
pub async fn run_once(
    state: &BotState,
    cfg: &ReportConfig,
    started: f64,
    now: f64,
) -> Option<(f64, Outcome)> {
    let store: &Store = &state.store;
    let name = cfg.name.clone();
    let last = match store.last_report_slot(name.clone()).await {
        Ok(Some(l)) => l,
        Ok(None) => {
            if let Err(e) = store.report_baseline(name.clone(), now).await {
                tracing::error!(report = %name, error = %e, "cannot record the report baseline");
            }
            return None;
        }
        Err(e) => {
            tracing::error!(report = %name, error = %e, "cannot read the report slots");
            return None;
        }
    };
    let slot = due_slot(cfg, last, now)?;
    let late = slot < started - 1.0;
    let Some(prometheus) = state.config.prometheus.as_ref() else {
        tracing::error!(report = %name, "reports need [prometheus] url");
        return None;
    };
    let at = DateTime::from_timestamp(slot as i64, 0)?;
    let t0 = Instant::now();
    tracing::info!(report = %name, slot = %at.to_rfc3339(), late, "computing report");
    let agents = AgentEvents::from_config(&state.config);
    let names = state.identity.names().await;
    let built = build(Inputs {
        config: cfg,
        prometheus_url: &prometheus.url,
        store: Some(store),
        at,
        late,
        agent_events: agents.as_ref().map(|a| a as &dyn OomEvents),
        names: &names,
        lifecycle: &state.config.lifecycle,
    })
    .await;
    let metrics = &state.metrics;
    metrics
        .report_duration
        .with_label_values(&[name.as_str()])
        .observe(t0.elapsed().as_secs_f64());
    let message = Message::Report(Box::new(built.message));
    let deliveries = if built.outcome == Outcome::Empty {
        Vec::new()
    } else {
        deliveries(cfg, &message)
    };
    let outcome = built.outcome;
    for f in &built.failures {
        tracing::warn!(report = %name, failure = %f, "report section could not be computed");
    }
    if outcome == Outcome::Failed {
        tracing::error!(report = %name, "no section of the report could be computed; it goes out saying so");
    }
    match store
        .claim_report_slot(
            name.clone(),
            slot,
            late,
            outcome.as_str().to_string(),
            deliveries,
        )
        .await
    {
        Ok(true) => {
            metrics
                .reports
                .with_label_values(&[name.as_str(), outcome.as_str()])
                .inc();
            tracing::info!(
                report = %name,
                slot = %at.to_rfc3339(),
                late,
                outcome = outcome.as_str(),
                findings = built.findings,
                failed_queries = built.failures.len(),
                seconds = t0.elapsed().as_secs_f64(),
                "report enqueued{}",
                if outcome == Outcome::Empty { " (empty: nothing found, nothing sent)" } else { "" }
            );
            state.outbox.wake();
            Some((slot, outcome))
        }
        Ok(false) => {
            tracing::info!(report = %name, slot = %at.to_rfc3339(), "report slot already claimed (another process or an earlier run)");
            None
        }
        Err(e) => {
            metrics
                .reports
                .with_label_values(&[name.as_str(), Outcome::Failed.as_str()])
                .inc();
            tracing::error!(report = %name, slot = %at.to_rfc3339(), error = %e, "cannot claim the report slot");
            None
        }
    }
}

async fn report_loop(state: Arc<BotState>, cfg: ReportConfig, mut stop: watch::Receiver<bool>) {
    tracing::info!(
        report = %cfg.name,
        schedule = %cfg.schedule_text,
        timezone = %cfg.timezone,
        period = %humantime::format_duration(cfg.period),
        "report schedule started"
    );
    let started = store::now();
    loop {
        run_once(&state, &cfg, started, store::now()).await;
        let now = store::now();
        let wait = next_slot(&cfg, now)
            .map(|n| (n - now).clamp(0.05, 60.0))
            .unwrap_or(60.0);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs_f64(wait)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(expr: &str, tz: &str) -> ReportConfig {
        let (schedule_text, schedule) = crate::config::paging::cron_schedule(expr).unwrap();
        ReportConfig {
            name: "daily".into(),
            schedule_text,
            schedule,
            timezone: tz.parse().unwrap(),
            period: Duration::from_secs(86_400),
            slack_channel: Some("C1".into()),
            discord_channel: None,
            email: vec![],
            only_if_findings: false,
            sections: crate::config::reports::SectionKind::ALL.to_vec(),
            checks: vec![],
            query_timeout: Duration::from_secs(5),
        }
    }

    #[test]
    fn the_latest_missed_slot_is_owed_once_in_the_reports_time_zone() {
        // A 5-field crontab line: 08:00 every day, Berlin time.
        let c = cfg("0 8 * * *", "Europe/Berlin");
        // 2026-11-28 07:00 UTC = 08:00 CET.
        let slot_28 = 1_795_849_200.0;
        let slot_27 = slot_28 - 86_400.0;
        // Down from before the 27th's slot until after the 28th's: only the 28th's.
        assert_eq!(
            due_slot(&c, slot_27 - 3600.0, slot_28 + 600.0),
            Some(slot_28)
        );
        assert_eq!(due_slot(&c, slot_28, slot_28 + 600.0), None);
        assert_eq!(next_slot(&c, slot_28), Some(slot_28 + 86_400.0));
    }
}
