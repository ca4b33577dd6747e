//! The outbox worker: drains the durable pending deliveries in the store
//! through the notifiers (the enqueue handle is `store::outbox::Outbox`).
//! It sits above `notify`, `alert` and `store`; no integration imports it.
//!
//! Rows are taken oldest first, one at a time per (group, destination), so a
//! post precedes its edits and thread replies. An alert row always renders
//! the group's latest state; a newer state arriving while a row is in flight
//! keeps the row for another run. 429s honour the platform's delay (and pause
//! that platform), 5xx and network errors back off exponentially with jitter,
//! permanent errors become dead letters. Rows survive restarts and `kill -9`:
//! they are only removed after the platform answered. This module does not
//! parse AlertManager payloads (see `alert.rs`) or speak any wire format.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng as _;
use tokio::task::JoinSet;

use crate::alert::{self, Links};
use crate::bot::state::BotMetrics;
use crate::config::BotConfig;
use crate::notify::{Delivery, Error, Message, Notifier, Op, Outgoing, PlatformRef};
use crate::routing::Target;
use crate::store::outbox::Outbox;
use crate::store::{self, OutboxRow, Store, KIND_ALERT, KIND_NOTICE};

/// How long a delivery the platform accepted keeps trying to be recorded
/// while the store is unreachable (within a PostgreSQL claim's 60 s lease,
/// so no other replica sends the row meanwhile).
const RECORD_PATIENCE: Duration = Duration::from_secs(45);

/// The notifiers by platform; a platform absent from the config is `None`.
#[derive(Clone)]
pub struct Notifiers {
    pub slack: Option<Arc<dyn Notifier>>,
    pub discord: Option<Arc<dyn Notifier>>,
    pub webhook: Option<Arc<dyn Notifier>>,
    pub console: Arc<dyn Notifier>,
    pub pagerduty: Option<Arc<dyn Notifier>>,
    pub email: Option<Arc<dyn Notifier>>,
}

impl Notifiers {
    /// The notifier and channel for a target, if it is still configured.
    fn resolve(&self, target: &Target, cfg: &BotConfig) -> Option<(Arc<dyn Notifier>, String)> {
        match target {
            Target::Slack(c) => self.slack.clone().map(|n| (n, c.clone())),
            Target::Discord(c) => self.discord.clone().map(|n| (n, c.to_string())),
            Target::Webhook(id) => {
                cfg.routing.webhook_url(id)?;
                self.webhook.clone().map(|n| (n, id.clone()))
            }
            Target::Console => Some((self.console.clone(), String::new())),
            Target::PagerDuty(id) => {
                cfg.routing.pagerduty_key(id)?;
                self.pagerduty.clone().map(|n| (n, id.clone()))
            }
            Target::Email(a) => self.email.clone().map(|n| (n, a.clone())),
        }
    }
}

/// Drains the outbox until shut down.
pub struct Worker {
    pub store: Store,
    pub outbox: Outbox,
    pub notifiers: Notifiers,
    pub config: Arc<BotConfig>,
    pub metrics: Arc<BotMetrics>,
    /// Suggests a runbook for the "Run runbook" button when the alert does
    /// not name one (set by the chat role before [`Worker::run`]).
    pub suggest_runbook: Option<crate::alert::RunbookSuggester>,
    /// Node names and OOM victims for alert messages (`None`: names from
    /// alert labels and DNS only, no victims).
    pub identity: Option<Arc<crate::inventory::Identity>>,
}

/// What one delivery attempt ended in (for the worker's bookkeeping).
struct Done {
    key: (i64, String),
    platform: &'static str,
    pause_until: Option<Instant>,
}

impl Worker {
    /// Runs until `shutdown` resolves, then waits (bounded) for deliveries
    /// in flight; anything unfinished stays in the outbox for the next start.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let this = Arc::new(self);
        let concurrency = this.config.delivery.concurrency;
        let mut inflight: HashSet<(i64, String)> = HashSet::new();
        let mut paused: HashMap<&'static str, Instant> = HashMap::new();
        let mut tasks: JoinSet<Done> = JoinSet::new();
        let mut last_gauge = Instant::now() - Duration::from_secs(2);
        tokio::pin!(shutdown);
        match this.store.pending().await {
            Ok(n) if n > 0 => tracing::info!(pending = n, "resuming pending deliveries"),
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "cannot read the outbox"),
        }
        loop {
            let mut wait = Duration::from_secs(5);
            // Due rows left waiting (their key in flight, their platform
            // paused) wake us through a finished task or the pause timer.
            let mut skipped = false;
            if inflight.len() < concurrency {
                let now_wall = store::now();
                match this
                    .store
                    .due(now_wall, concurrency * 4 + inflight.len())
                    .await
                {
                    Ok(rows) => {
                        // Rows not started now go back (PostgreSQL claims).
                        let mut unused = Vec::new();
                        for row in rows {
                            if inflight.len() >= concurrency {
                                unused.push(row.id);
                                continue;
                            }
                            let key = (row.group_id, row.destination.clone());
                            if inflight.contains(&key) {
                                skipped = true;
                                unused.push(row.id);
                                continue;
                            }
                            let platform = Target::parse_key(&row.destination)
                                .map(|t| t.platform())
                                .unwrap_or("unknown");
                            if let Some(until) = paused.get(platform) {
                                let now = Instant::now();
                                if *until > now {
                                    wait = wait.min(*until - now);
                                    skipped = true;
                                    unused.push(row.id);
                                    continue;
                                }
                            }
                            inflight.insert(key);
                            let w = this.clone();
                            tasks.spawn(async move { w.deliver(row).await });
                        }
                        if !unused.is_empty() {
                            if let Err(e) = this.store.release(unused).await {
                                tracing::warn!(error = %e, "cannot release outbox claims; they expire with their lease");
                            }
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot read due deliveries");
                        wait = Duration::from_secs(1);
                    }
                }
                if !skipped {
                    match this.store.next_due().await {
                        Ok(Some(at)) => {
                            let secs = (at - store::now()).clamp(0.0, 5.0);
                            wait = wait.min(Duration::from_secs_f64(secs));
                        }
                        Ok(None) => {}
                        Err(e) => tracing::error!(error = %e, "cannot read the outbox"),
                    }
                }
                wait = wait.max(Duration::from_millis(1));
            }
            if last_gauge.elapsed() >= Duration::from_secs(1) {
                update_pending(&this).await;
                last_gauge = Instant::now();
            }
            tokio::select! {
                _ = &mut shutdown => break,
                _ = this.outbox.woken() => {}
                Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                    if let Ok(done) = done {
                        inflight.remove(&done.key);
                        if let Some(until) = done.pause_until {
                            paused.insert(done.platform, until);
                        }
                    } else {
                        // A panicked delivery: its row stays in the outbox.
                        inflight.clear();
                    }
                    while let Some(done) = tasks.try_join_next() {
                        if let Ok(done) = done {
                            inflight.remove(&done.key);
                            if let Some(until) = done.pause_until {
                                paused.insert(done.platform, until);
                            }
                        }
                    }
                }
                _ = tokio::time::sleep(wait) => {}
            }
        }
        // A delivery in flight may take its whole `delivery.timeout` to be
        // answered, then a store write: given up sooner, a post the platform
        // already took would be sent again by the next replica or start.
        let drain = async { while tasks.join_next().await.is_some() {} };
        let bound = this.config.delivery.timeout + Duration::from_secs(5);
        if tokio::time::timeout(bound, drain).await.is_err() {
            tracing::warn!(
                "deliveries still in flight at shutdown; they will resume on the next start"
            );
        }
    }

    /// A group's card as it stands now (with its escalation step), and the
    /// revision it shows; None when the group is gone.
    async fn render(&self, group_id: i64) -> Result<Option<(Message, i64)>, store::Error> {
        let Some(g) = self.store.group(group_id).await? else {
            return Ok(None);
        };
        let mut links = Links {
            alertmanager: self.config.alertmanager.as_ref().map(|a| a.url.clone()),
            suggest_runbook: self.suggest_runbook.clone(),
            ..Links::default()
        };
        if let Some(identity) = &self.identity {
            links = alert::identity_links(identity, &g, links).await;
        }
        let mut m = alert::render_group(&g, &self.config.routing, &links);
        if let Message::Alert(a) = &mut m {
            if let Ok(Some((step, of))) = self.store.escalation_step(g.id).await {
                a.escalation = Some(crate::notify::EscalationStep { step, of });
            }
        }
        Ok(Some((m, g.rev)))
    }

    async fn deliver(self: Arc<Self>, row: OutboxRow) -> Done {
        let key = (row.group_id, row.destination.clone());
        let target = Target::parse_key(&row.destination);
        let platform = target.as_ref().map(Target::platform).unwrap_or("unknown");
        let mut done = Done {
            key,
            platform,
            pause_until: None,
        };
        let Some(target) = target else {
            self.fail_permanently(row, "unknown destination key".into(), platform)
                .await;
            return done;
        };
        let Some((notifier, channel)) = self.notifiers.resolve(&target, &self.config) else {
            let reason = format!("destination {} is no longer configured", row.destination);
            self.fail_permanently(row, reason, platform).await;
            return done;
        };
        let age = store::now() - row.created_at;
        if row.attempts > 0 && age > self.config.delivery.give_up_after.as_secs_f64() {
            let reason = format!("gave up after {} attempts over {:.0}s", row.attempts, age);
            self.fail_permanently(row, reason, platform).await;
            return done;
        }
        let parent = match self
            .store
            .message(row.group_id, row.destination.clone())
            .await
        {
            Ok(m) => m,
            Err(e) => {
                self.retry(&row, None, format!("store: {e}"), platform)
                    .await;
                return done;
            }
        };
        let rendered = if row.kind == KIND_ALERT || row.kind == KIND_NOTICE {
            match self.render(row.group_id).await {
                Ok(Some(r)) => Some(r),
                // A notice whose group is gone is still a reply.
                Ok(None) if row.kind == KIND_NOTICE => None,
                Ok(None) => {
                    // The group is gone (should not happen): nothing to show.
                    let _ = self.store.delivered(row.id).await;
                    return done;
                }
                Err(e) => {
                    self.retry(&row, None, format!("store: {e}"), platform)
                        .await;
                    return done;
                }
            }
        } else {
            None
        };
        let (message, rendered_rev, card) = match rendered {
            Some((m, rev)) if row.kind == KIND_ALERT => (m, rev, None),
            card => match row.body.as_deref().map(serde_json::from_str::<Message>) {
                Some(Ok(m)) => (m, row.rev, card.map(|(c, _)| c)),
                _ => {
                    self.fail_permanently(row, "unreadable reply body".into(), platform)
                        .await;
                    return done;
                }
            },
        };
        let renotify = match &card {
            Some(Message::Alert(a)) => Some(a.as_ref()),
            _ => None,
        };
        // Correlated P1/P2 groups share one PagerDuty incident.
        let incident = if row.kind == KIND_ALERT && platform == "pagerduty" {
            match self.store.incident(row.group_id).await {
                Ok(i) => i,
                Err(e) => {
                    self.retry(&row, None, format!("store: {e}"), platform)
                        .await;
                    return done;
                }
            }
        } else {
            None
        };
        let existing = parent.map(|m| PlatformRef {
            channel: m.channel,
            message_id: m.message_id,
        });
        let op = match (row.kind == KIND_ALERT, existing) {
            (true, Some(p)) => Op::Edit(p),
            (true, None) => Op::Post,
            (false, Some(p)) => Op::Reply(p),
            // The parent was never posted (dead-lettered): post unthreaded.
            (false, None) => Op::Post,
        };
        let out = Outgoing {
            channel: &channel,
            op: op.clone(),
            message: &message,
            renotify,
            incident,
        };
        let timeout = self.config.delivery.timeout;
        let result = match tokio::time::timeout(timeout, notifier.send(&out)).await {
            Ok(r) => r,
            Err(_) => Err(Error::retryable(format!("no answer within {timeout:?}"))),
        };
        match result {
            Ok(Delivery { message: r }) => {
                self.count(platform, "sent");
                // The platform has it: keep trying to record that through a
                // store outage (a PostgreSQL restart, a failover) rather than
                // leave the row to be sent again when the store is back.
                let until = Instant::now() + RECORD_PATIENCE;
                let mut pause = Duration::from_millis(100);
                loop {
                    let stored = if row.kind == KIND_ALERT {
                        self.store
                            .alert_delivered(
                                row.clone(),
                                rendered_rev,
                                r.channel.clone(),
                                r.message_id.clone(),
                            )
                            .await
                    } else {
                        self.store.delivered(row.id).await
                    };
                    match stored {
                        Ok(_) => break,
                        Err(e) if Instant::now() + pause < until => {
                            tracing::warn!(error = %e, outbox_id = row.id, "delivered but cannot record it yet; retrying");
                            tokio::time::sleep(pause).await;
                            pause = (pause * 2).min(Duration::from_secs(5));
                        }
                        Err(e) => {
                            // The row will be sent again (an edit for alert
                            // rows, so at worst a repeated reply).
                            tracing::error!(error = %e, outbox_id = row.id, "delivered but cannot record it");
                            break;
                        }
                    }
                }
                tracing::debug!(
                    platform,
                    destination = %row.destination,
                    group_id = row.group_id,
                    op = op_name(&op),
                    "delivered"
                );
            }
            Err(Error::Retryable {
                retry_after: Some(delay),
                reason,
            }) => {
                self.count(platform, "rate_limited");
                let until = Instant::now() + delay;
                done.pause_until = Some(until);
                tracing::warn!(
                    platform,
                    destination = %row.destination,
                    retry_after_secs = delay.as_secs_f64(),
                    error = %reason,
                    "rate limited; retrying after the platform's delay"
                );
                self.schedule(&row, delay, reason).await;
            }
            Err(Error::Retryable {
                retry_after: None,
                reason,
            }) => {
                self.retry(&row, None, reason, platform).await;
            }
            Err(Error::MessageGone { reason }) if row.kind == KIND_ALERT && row.attempts < 3 => {
                // Someone deleted the alert message: post it anew.
                tracing::warn!(platform, destination = %row.destination, error = %reason, "alert message is gone; posting a new one");
                if let Err(e) = self
                    .store
                    .forget_message(row.group_id, row.destination.clone())
                    .await
                {
                    tracing::error!(error = %e, "cannot forget the message");
                }
                self.schedule(&row, Duration::ZERO, reason).await;
            }
            Err(Error::MessageGone { reason }) | Err(Error::Permanent { reason }) => {
                self.fail_permanently(row, reason, platform).await;
            }
        }
        done
    }

    async fn retry(
        &self,
        row: &OutboxRow,
        delay: Option<Duration>,
        reason: String,
        platform: &'static str,
    ) {
        self.count(platform, "retry");
        let delay = delay.unwrap_or_else(|| {
            backoff(
                row.attempts,
                self.config.delivery.backoff_initial,
                self.config.delivery.backoff_max,
            )
        });
        tracing::warn!(
            platform,
            destination = %row.destination,
            attempt = row.attempts + 1,
            retry_in_secs = delay.as_secs_f64(),
            error = %reason,
            "delivery failed; will retry"
        );
        self.schedule(row, delay, reason).await;
    }

    async fn schedule(&self, row: &OutboxRow, delay: Duration, reason: String) {
        let at = store::now() + delay.as_secs_f64();
        if let Err(e) = self.store.retry_at(row.id, at, reason).await {
            tracing::error!(error = %e, outbox_id = row.id, "cannot schedule a retry; the row stays due");
        }
    }

    async fn fail_permanently(&self, row: OutboxRow, reason: String, platform: &'static str) {
        self.count(platform, "dead_letter");
        tracing::error!(
            platform,
            destination = %row.destination,
            group_id = row.group_id,
            kind = %row.kind,
            error = %reason,
            "delivery failed permanently; moved to dead letters"
        );
        if let Err(e) = self.store.dead_letter(row, reason).await {
            tracing::error!(error = %e, "cannot record the dead letter");
        }
    }

    fn count(&self, platform: &str, outcome: &str) {
        self.metrics
            .notifications
            .with_label_values(&[platform, outcome])
            .inc();
    }
}

async fn update_pending(w: &Worker) {
    if let Ok(n) = w.store.pending().await {
        w.metrics.outbox_pending.set(n);
    }
}

fn op_name(op: &Op) -> &'static str {
    match op {
        Op::Post => "post",
        Op::Edit(_) => "edit",
        Op::Reply(_) => "reply",
    }
}

/// Exponential backoff with jitter: `initial * 2^attempts`, capped at `max`,
/// then a random value in its upper half (so retries spread out).
pub fn backoff(attempts: i64, initial: Duration, max: Duration) -> Duration {
    let exp = attempts.clamp(0, 30) as u32;
    let base = initial
        .checked_mul(2u32.saturating_pow(exp))
        .unwrap_or(max)
        .min(max);
    let half = base / 2;
    let jitter = rand::rng().random_range(0.0..=1.0);
    half + half.mul_f64(jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let i = Duration::from_secs(1);
        let m = Duration::from_secs(60);
        for (attempts, lo, hi) in [
            (0, 0.5, 1.0),
            (1, 1.0, 2.0),
            (3, 4.0, 8.0),
            (10, 30.0, 60.0),
            (1000, 30.0, 60.0),
        ] {
            for _ in 0..20 {
                let d = backoff(attempts, i, m).as_secs_f64();
                assert!((lo..=hi).contains(&d), "attempts {attempts}: {d}");
            }
        }
    }
}
