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
        for c in [
            Box::new(alerts_received.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(notifications.clone()),
            Box::new(outbox_pending.clone()),
            Box::new(escalations.clone()),
            Box::new(acknowledgements.clone()),
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
