//! Paging beyond the first message: escalation of groups nobody
//! acknowledges, and the P4 digest. Both are driven by the store, never by
//! in-memory timers alone: an escalation's due time and a digest's slot are
//! rows, claimed in the same transaction that enqueues what they send, so a
//! restart, a `kill -9` or a chat outage neither loses nor doubles a step or
//! a digest. What goes on the wire is the notifiers' business (everything
//! here goes through the outbox); `webhook.rs` takes PagerDuty's v3
//! webhooks back in.

pub mod webhook;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::DateTime;
use tokio::sync::watch;

use crate::alert::Webhook;
use crate::bot::state::BotState;
use crate::config::paging::DigestConfig;
use crate::inventory::NodeNames;
use crate::notify::email::MAILED_REPLY_PREFIX;
use crate::notify::{Message, TextMessage};
use crate::routing::{Routing, Tier};
use crate::store::paging::{DigestDelivery, EscalationPlan, NO_ESCALATION};
use crate::store::{self, Store};

/// How often new groups are looked at for escalation (the timing error of
/// a step is bounded by this only when it was due within one poll of the
/// group's arrival; later steps are slept for exactly).
const CANDIDATE_POLL: Duration = Duration::from_millis(500);

/// Starts the escalation and digest workers the config asks for.
pub fn spawn(state: Arc<BotState>, stop: watch::Receiver<bool>) {
    if state
        .config
        .routing
        .destinations
        .iter()
        .any(|d| d.escalation.is_some())
    {
        tokio::spawn(escalation_loop(state.clone(), stop.clone()));
    }
    if let Some(d) = state.config.digest.clone() {
        if state.config.routing.destinations.iter().any(|d| d.digest) {
            tokio::spawn(digest_loop(state, d, stop));
        }
    }
}

/// The escalation plan of every escalating destination (by its index).
pub fn plans(routing: &Routing) -> Vec<EscalationPlan> {
    routing
        .destinations
        .iter()
        .enumerate()
        .filter_map(|(i, d)| {
            let e = d.escalation.as_ref()?;
            Some(EscalationPlan {
                dest: i as i64,
                targets: e.notify.iter().map(|t| t.key()).collect(),
                steps: e.steps(),
                repeat_every_secs: e.repeat_every.map(|d| d.as_secs_f64()),
            })
        })
        .collect()
}

/// The text of a step (a thread reply under the group's message).
pub fn step_text(group_id: i64, step: u32, steps: u32) -> String {
    format!(
        "{MAILED_REPLY_PREFIX} step {step} of {steps}: alert group #{group_id} is still firing and nobody has acknowledged it. Acknowledge it (button, `/gpuops ack {group_id}`, or in PagerDuty) to stop further steps."
    )
}

/// One pass: start escalations for new groups, fire the steps due.
/// Returns how long to sleep before the next pass.
pub async fn escalate_once(state: &BotState) -> Duration {
    let routing = &state.config.routing;
    let tiers: Vec<String> = Tier::ALL
        .iter()
        .filter(|t| {
            routing
                .destinations
                .iter()
                .any(|d| d.escalation.is_some() && d.tiers.contains(t))
        })
        .map(|t| t.as_str().to_string())
        .collect();
    match state.store.escalation_candidates(tiers).await {
        Ok(cands) if !cands.is_empty() => {
            let now = store::now();
            let mut rows = Vec::new();
            for c in cands {
                let hook: Option<Webhook> = serde_json::from_str(&c.state).ok();
                let labels = hook.map(|h| h.shared_labels()).unwrap_or_default();
                let tier = Tier::parse(&c.tier).unwrap_or(routing.default_tier);
                let base = if c.refired { now } else { c.first_seen };
                let before = rows.len();
                for (i, d) in routing.destinations.iter().enumerate() {
                    if let Some(e) = &d.escalation {
                        if d.matches(tier, &labels) {
                            rows.push((
                                c.group_id,
                                i as i64,
                                e.steps(),
                                base + e.after.as_secs_f64(),
                            ));
                        }
                    }
                }
                if rows.len() == before {
                    rows.push((c.group_id, NO_ESCALATION, 0, 0.0));
                }
            }
            if let Err(e) = state.store.start_escalations(rows).await {
                tracing::error!(error = %e, "cannot start escalations");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::error!(error = %e, "cannot read escalation candidates"),
    }
    let now = store::now();
    // Write only when a step is due, or now and then to end the
    // escalations of resolved groups.
    let due = matches!(state.store.next_escalation_due().await, Ok(Some(at)) if at <= now);
    let sweep = (now as u64) % 5 == 0;
    if !due && !sweep {
        return next_wait(state).await;
    }
    match state
        .store
        .fire_due_escalations(now, plans(routing), Arc::new(step_text))
        .await
    {
        Ok(fired) => {
            for f in &fired {
                state
                    .metrics
                    .escalations
                    .with_label_values(&[&f.step.to_string()])
                    .inc();
                tracing::info!(
                    group_id = f.group_id,
                    destination = f.dest,
                    step = f.step,
                    steps = f.steps,
                    late_ms = ((now - f.due_at) * 1000.0).round(),
                    "escalation step fired"
                );
            }
            if !fired.is_empty() {
                state.outbox.wake();
            }
        }
        Err(e) => tracing::error!(error = %e, "cannot fire due escalations"),
    }
    next_wait(state).await
}

async fn next_wait(state: &BotState) -> Duration {
    match state.store.next_escalation_due().await {
        Ok(Some(at)) => {
            Duration::from_secs_f64((at - store::now()).clamp(0.0, CANDIDATE_POLL.as_secs_f64()))
        }
        _ => CANDIDATE_POLL,
    }
}

async fn escalation_loop(state: Arc<BotState>, mut stop: watch::Receiver<bool>) {
    tracing::info!("escalation worker started");
    loop {
        let wait = escalate_once(&state).await;
        tokio::select! {
            _ = tokio::time::sleep(wait.max(Duration::from_millis(5))) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// The latest slot of `d` in `(after, now]`, if any.
pub fn due_slot(d: &DigestConfig, after: f64, now: f64) -> Option<f64> {
    crate::config::paging::latest_slot(&d.schedule, d.timezone, after, now)
}

/// The next slot after `now`.
pub fn next_slot(d: &DigestConfig, now: f64) -> Option<f64> {
    crate::config::paging::next_slot(&d.schedule, d.timezone, now)
}

/// One pass of the digest: send the latest slot that is due and not yet
/// claimed; a slot before `started` (missed while the bot was down) is
/// marked late. Returns the slot claimed, if any.
pub async fn digest_once(state: &BotState, d: &DigestConfig, started: f64) -> Option<f64> {
    let store: &Store = &state.store;
    let now = store::now();
    let last = match store.last_digest_slot().await {
        Ok(Some(l)) => l,
        Ok(None) => {
            if let Err(e) = store.digest_baseline(now).await {
                tracing::error!(error = %e, "cannot record the digest baseline");
            }
            return None;
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot read the digest slots");
            return None;
        }
    };
    let slot = due_slot(d, last, now)?;
    let late = slot < started - 1.0;
    let groups = match store.digest_groups(last).await {
        Ok(g) => g,
        Err(e) => {
            tracing::error!(error = %e, "cannot read groups for the digest");
            return None;
        }
    };
    // A group whose state cannot be read is not "nothing happened": every
    // digest destination is told it is missing (it cannot be routed).
    let unreadable: Vec<i64> = groups
        .iter()
        .filter(|g| serde_json::from_str::<Webhook>(&g.state).is_err())
        .map(|g| g.group_id)
        .collect();
    if !unreadable.is_empty() {
        tracing::warn!(groups = ?unreadable, "digest groups with a state that cannot be read; the digest names them");
    }
    let names = state.identity.names().await;
    let mut deliveries = Vec::new();
    let mut mentioned = 0;
    for dest in state
        .config
        .routing
        .destinations
        .iter()
        .filter(|x| x.digest)
    {
        let mine: Vec<(&store::paging::DigestGroup, Webhook)> = groups
            .iter()
            .filter_map(|g| {
                let hook: Webhook = serde_json::from_str(&g.state).ok()?;
                dest.matches(Tier::P4, &hook.shared_labels())
                    .then_some((g, hook))
            })
            .collect();
        if mine.is_empty() && unreadable.is_empty() {
            continue;
        }
        mentioned += mine.len();
        let text = digest_text(d, slot, last, late, &mine, &unreadable, &names);
        let body =
            serde_json::to_string(&Message::Text(TextMessage::new(text, None))).unwrap_or_default();
        for t in dest.targets() {
            deliveries.push(DigestDelivery {
                destination: t.key(),
                body: body.clone(),
            });
        }
    }
    match store
        .claim_digest_slot(slot, late, mentioned, deliveries)
        .await
    {
        Ok(true) => {
            tracing::info!(
                slot = %fmt_local(d, slot),
                late,
                groups = mentioned,
                "digest slot claimed{}",
                if mentioned == 0 { " (empty: nothing sent)" } else { "" }
            );
            state.outbox.wake();
            Some(slot)
        }
        Ok(false) => None,
        Err(e) => {
            tracing::error!(error = %e, "cannot claim the digest slot");
            None
        }
    }
}

async fn digest_loop(state: Arc<BotState>, d: DigestConfig, mut stop: watch::Receiver<bool>) {
    tracing::info!(schedule = %d.schedule_text, timezone = %d.timezone, "digest worker started");
    let started = store::now();
    loop {
        digest_once(&state, &d, started).await;
        let now = store::now();
        let wait = next_slot(&d, now)
            .map(|n| (n - now).clamp(0.05, 60.0))
            .unwrap_or(60.0);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs_f64(wait)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

fn fmt_local(d: &DigestConfig, t: f64) -> String {
    DateTime::from_timestamp(t as i64, 0)
        .map(|u| {
            u.with_timezone(&d.timezone)
                .format("%a %Y-%m-%d %H:%M %Z")
                .to_string()
        })
        .unwrap_or_default()
}

/// The digest of one destination: a subject line, then what is still
/// firing, what fired and what resolved since the last slot, by alert name
/// and node. Groups it could not read (`unreadable`, their ids) are named
/// first: the digest never reads as "nothing happened" when it could not
/// see.
pub fn digest_text(
    d: &DigestConfig,
    slot: f64,
    since: f64,
    late: bool,
    groups: &[(&store::paging::DigestGroup, Webhook)],
    unreadable: &[i64],
    names: &NodeNames,
) -> String {
    // (section, alertname) -> nodes
    let mut sections: BTreeMap<(u8, String), Vec<String>> = BTreeMap::new();
    let (mut firing, mut resolved, mut new) = (0, 0, 0);
    for (g, hook) in groups {
        let section = if g.status == "firing" {
            firing += 1;
            if g.first_seen > since {
                new += 1;
            }
            0
        } else {
            resolved += 1;
            2
        };
        for a in &hook.alerts {
            // Labels are outside text: one line each (the notifiers
            // escape the digest for their format).
            let name = a
                .labels
                .get("alertname")
                .map(|n| crate::escape::line(n))
                .unwrap_or_else(|| "(no alertname)".into());
            // The node by the name a person knows (the instance beside it).
            let instance = a.labels.get("instance").filter(|i| !i.is_empty());
            let node = crate::message::node_with_instance(
                names
                    .name_of(instance.map(String::as_str), &a.labels)
                    .as_deref(),
                instance.map(String::as_str),
            )
            .unwrap_or_else(|| "-".into());
            let node = crate::escape::line(&node);
            let s = if section == 0 && a.status != "firing" {
                2
            } else {
                section
            };
            let nodes = sections.entry((s, name)).or_default();
            if !nodes.contains(&node) {
                nodes.push(node);
            }
        }
    }
    let mut out = format!(
        "gpuops P4 digest {}: {}{firing} still firing ({new} new), {resolved} resolved{}",
        fmt_local(d, slot),
        if unreadable.is_empty() {
            String::new()
        } else {
            format!(
                "⚠ incomplete, {} group{} unreadable; ",
                unreadable.len(),
                if unreadable.len() == 1 { "" } else { "s" }
            )
        },
        if late { " [late]" } else { "" }
    );
    if !unreadable.is_empty() {
        let ids: Vec<String> = unreadable.iter().take(10).map(|i| i.to_string()).collect();
        out.push_str(&format!(
            "\n⚠ Could not read {} P4 group{} from the store (id {}{}): this digest may be missing what {} say; see `gpuops audit --group ID`.",
            unreadable.len(),
            if unreadable.len() == 1 { "" } else { "s" },
            ids.join(", "),
            if unreadable.len() > 10 { ", …" } else { "" },
            if unreadable.len() == 1 { "it would" } else { "they would" },
        ));
    }
    if late {
        out.push_str(&format!(
            "\nSent late (at {}): the bot was not running at the scheduled time.",
            fmt_local(d, store::now())
        ));
    }
    out.push_str(&format!("\nSince {}.\n", fmt_local(d, since)));
    for (sec, title) in [(0u8, "Still firing"), (2u8, "Resolved")] {
        let items: Vec<String> = sections
            .iter()
            .filter(|((s, _), _)| *s == sec)
            .map(|((_, name), nodes)| {
                let shown: Vec<&str> = nodes.iter().take(10).map(String::as_str).collect();
                let more = nodes.len().saturating_sub(10);
                format!(
                    "- {name}: {}{}",
                    shown.join(", "),
                    if more > 0 {
                        format!(" +{more} more")
                    } else {
                        String::new()
                    }
                )
            })
            .collect();
        if !items.is_empty() {
            out.push_str(&format!("\n{title}:\n{}\n", items.join("\n")));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(expr: &str, tz: &str) -> DigestConfig {
        let (schedule_text, schedule) = crate::config::paging::cron_schedule(expr).unwrap();
        DigestConfig {
            schedule_text,
            schedule,
            timezone: tz.parse().unwrap(),
        }
    }

    #[test]
    fn the_latest_missed_slot_is_owed_once_in_the_schedules_time_zone() {
        // Daily at 09:00 Berlin (08:00 UTC in winter).
        let d = digest("0 0 9 * * *", "Europe/Berlin");
        let day = |d: u32, h: u32, m: u32| {
            chrono::TimeZone::with_ymd_and_hms(&chrono::Utc, 2026, 11, d, h, m, 0)
                .unwrap()
                .timestamp() as f64
        };
        // Down from Monday 07:00 UTC to Wednesday 10:00 UTC: one slot owed, Wednesday's.
        assert_eq!(
            due_slot(&d, day(23, 7, 0), day(25, 10, 0)),
            Some(day(25, 8, 0))
        );
        // Claimed: nothing more until Thursday.
        assert_eq!(due_slot(&d, day(25, 8, 0), day(25, 10, 0)), None);
        assert_eq!(next_slot(&d, day(25, 10, 0)), Some(day(26, 8, 0)));
    }

    #[test]
    fn digest_with_unreadable_groups_never_says_nothing_happened() {
        let d = digest("0 0 9 * * *", "UTC");
        let names = NodeNames::default();
        let text = digest_text(&d, 86_400.0, 0.0, false, &[], &[7, 9], &names);
        let subject = text.lines().next().unwrap_or_default();
        assert!(
            subject.contains("⚠ incomplete, 2 groups unreadable; 0 still firing"),
            "{text}"
        );
        assert!(
            text.contains("Could not read 2 P4 groups from the store (id 7, 9)"),
            "{text}"
        );
        let clean = digest_text(&d, 86_400.0, 0.0, false, &[], &[], &names);
        assert!(!clean.contains("⚠"), "{clean}");
    }

    #[test]
    fn digest_lines_name_the_node_with_its_instance_beside_it() {
        let d = digest("0 0 9 * * *", "UTC");
        let hook: Webhook = serde_json::from_str(
            r#"{"groupKey":"g","status":"firing","alerts":[
                {"status":"firing","labels":{"alertname":"GPUIdle","instance":"127.0.0.1:18949"}},
                {"status":"firing","labels":{"alertname":"GPUIdle","instance":"10.0.0.9:9949"}}]}"#,
        )
        .unwrap();
        let group = store::paging::DigestGroup {
            group_id: 1,
            status: "firing".into(),
            state: String::new(),
            first_seen: 10.0,
            updated_at: 10.0,
        };
        let names = NodeNames::fixed([("127.0.0.1:18949", "gpu-node-17")]);
        let text = digest_text(&d, 86_400.0, 0.0, false, &[(&group, hook)], &[], &names);
        assert!(
            text.contains("- GPUIdle: gpu-node-17 (127.0.0.1:18949), 10.0.0.9:9949"),
            "{text}"
        );
    }
}
