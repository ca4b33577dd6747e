//! The bot's shared state: [`BotState`] (config, store, outbox, metrics) and
//! [`BotMetrics`], the bot's own counters. A leaf that every handler imports;
//! it must not import the handlers or the wiring (`bot_role`).

use std::sync::Arc;

use crate::config::BotConfig;
use crate::store::outbox::Outbox;
use crate::store::Store;
use crate::telemetry::HttpMetrics;

/// Everything the bot's handlers share (the chat role uses it too).
pub struct BotState {
    pub config: Arc<BotConfig>,
    pub store: Store,
    /// Enqueue thread replies, acks and refreshes (durable, then delivered).
    pub outbox: Outbox,
    pub metrics: Arc<BotMetrics>,
    pub http: Arc<HttpMetrics>,
    /// Node names and OOM victims for human-facing text (shared with the
    /// outbox worker: one cache).
    pub identity: Arc<crate::inventory::Identity>,
}

/// The bot's own counters (besides the HTTP RED metrics).
pub struct BotMetrics {
    registry: prometheus::Registry,
    /// `gpuops_alerts_received_total{status,tier}`, per alert in a webhook.
    pub alerts_received: prometheus::IntCounterVec,
    /// `gpuops_notifications_total{platform,outcome}`; outcome is `sent`,
    /// `rate_limited`, `retry` or `dead_letter`.
    pub notifications: prometheus::IntCounterVec,
    /// `gpuops_outbox_pending`.
    pub outbox_pending: prometheus::IntGauge,
    /// `gpuops_escalations_total{step}`: escalation steps fired.
    pub escalations: prometheus::IntCounterVec,
    /// `gpuops_acknowledgements_total{source}`: `slack`, `discord`, `pagerduty`.
    pub acknowledgements: prometheus::IntCounterVec,
    /// `gpuops_reports_total{name,outcome}`: scheduled report slots by
    /// outcome (`sent`, `empty`, `partial`, `failed`).
    pub reports: prometheus::IntCounterVec,
    /// `gpuops_report_duration_seconds{name}`: computing and rendering one.
    pub report_duration: prometheus::HistogramVec,
    /// `gpuops_pagerduty_webhooks_ignored_total{reason}`: signed PagerDuty
    /// webhooks answered 200 but acted on nothing (`stale`, `no_event_id`,
    /// `replayed`, `unknown_incident`).
    pub pagerduty_webhooks_ignored: prometheus::IntCounterVec,
    /// `gpuops_nodes{state}`: tracked nodes per state (`src/lifecycle.rs`),
    /// set from the store at each scrape.
    pub nodes: prometheus::IntGaugeVec,
    /// `gpuops_node_out_of_service_seconds{node,state}`: each node out of
    /// service, seconds since its stretch began.
    pub node_out_of_service: prometheus::GaugeVec,
    /// `gpuops_node_found_checks_total{scheduler,outcome}`: reads of the
    /// schedulers' view of the nodes from Prometheus (`src/found.rs`), by
    /// scheduler (`slurm`, `kubernetes`) and outcome (`ok`, `error`).
    pub found_checks: prometheus::IntCounterVec,
}

impl BotMetrics {
    pub fn new() -> BotMetrics {
        use prometheus::{IntCounterVec, IntGauge, Opts};
        let registry = prometheus::Registry::new();
        let alerts_received = IntCounterVec::new(
            Opts::new(
                "gpuops_alerts_received_total",
                "Alerts received in AlertManager webhooks (duplicates included), by alert status and tier.",
            ),
            &["status", "tier"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let notifications = IntCounterVec::new(
            Opts::new(
                "gpuops_notifications_total",
                "Notifier calls (slack, discord, webhook, console, pagerduty, email) by platform and outcome (sent, rate_limited, retry, dead_letter).",
            ),
            &["platform", "outcome"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let outbox_pending = IntGauge::new(
            "gpuops_outbox_pending",
            "Deliveries waiting in the outbox (posts, edits, thread replies).",
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let escalations = IntCounterVec::new(
            Opts::new(
                "gpuops_escalations_total",
                "Escalation steps fired (a group not acknowledged in time), by step number.",
            ),
            &["step"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let acknowledgements = IntCounterVec::new(
            Opts::new(
                "gpuops_acknowledgements_total",
                "Alert groups acknowledged, by where (slack, discord, pagerduty).",
            ),
            &["source"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let reports = IntCounterVec::new(
            Opts::new(
                "gpuops_reports_total",
                "Scheduled health report slots, by report name and outcome (sent, empty: nothing found with only_if_findings, partial: some sections could not be computed, failed: not enqueued).",
            ),
            &["name", "outcome"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let report_duration = prometheus::HistogramVec::new(
            prometheus::HistogramOpts::new(
                "gpuops_report_duration_seconds",
                "Time to compute and render a scheduled health report (queries, store, charts), by report name.",
            )
            .buckets(vec![0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]),
            &["name"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let pagerduty_webhooks_ignored = IntCounterVec::new(
            Opts::new(
                "gpuops_pagerduty_webhooks_ignored_total",
                "Signed PagerDuty webhooks answered 200 but acted on nothing, by reason (stale: occurred_at too old or ahead, no_event_id, replayed: event id seen before, unknown_incident: an incident key gpuops did not send).",
            ),
            &["reason"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        for reason in ["stale", "no_event_id", "replayed", "unknown_incident"] {
            pagerduty_webhooks_ignored.with_label_values(&[reason]);
        }
        let nodes = prometheus::IntGaugeVec::new(
            Opts::new(
                "gpuops_nodes",
                "Nodes whose state gpuops tracks, by state (in_service, quarantined, awaiting_repair, verifying), from the bot's store.",
            ),
            &["state"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let node_out_of_service = prometheus::GaugeVec::new(
            Opts::new(
                "gpuops_node_out_of_service_seconds",
                "Seconds since each node not in service left service, with its current state, from the bot's store.",
            ),
            &["node", "state"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let found_checks = IntCounterVec::new(
            Opts::new(
                "gpuops_node_found_checks_total",
                "Reads from Prometheus of which nodes Slurm has drained or down and Kubernetes has cordoned, by scheduler (slurm, kubernetes) and outcome (ok, error: nothing was changed).",
            ),
            &["scheduler", "outcome"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        for s in ["slurm", "kubernetes"] {
            for o in ["ok", "error"] {
                found_checks.with_label_values(&[s, o]);
            }
        }
        for c in [
            Box::new(alerts_received.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(notifications.clone()),
            Box::new(outbox_pending.clone()),
            Box::new(escalations.clone()),
            Box::new(acknowledgements.clone()),
            Box::new(reports.clone()),
            Box::new(report_duration.clone()),
            Box::new(pagerduty_webhooks_ignored.clone()),
            Box::new(nodes.clone()),
            Box::new(node_out_of_service.clone()),
            Box::new(found_checks.clone()),
        ] {
            let _ = registry.register(c);
        }
        BotMetrics {
            registry,
            alerts_received,
            notifications,
            outbox_pending,
            escalations,
            acknowledgements,
            reports,
            report_duration,
            pagerduty_webhooks_ignored,
            nodes,
            node_out_of_service,
            found_checks,
        }
    }

    /// Sets the node gauges from the store's rows: per state, and per node
    /// out of service (series of returned nodes go away).
    pub fn set_nodes(&self, per_state: &[(&str, i64)], out: &[(&str, &str, f64)]) {
        for (state, n) in per_state {
            self.nodes.with_label_values(&[state]).set(*n);
        }
        self.node_out_of_service.reset();
        for (node, state, secs) in out {
            self.node_out_of_service
                .with_label_values(&[node, state])
                .set(*secs);
        }
    }

    pub fn gather(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.registry.gather()
    }
}

impl Default for BotMetrics {
    fn default() -> Self {
        BotMetrics::new()
    }
}
