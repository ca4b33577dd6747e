//! `POST /pagerduty/webhook`: PagerDuty's v3 webhooks back to the bot
//! (served when `[pagerduty] webhook_secret(_file)` is set; 404 otherwise).
//!
//! The raw body is verified before anything is parsed: `X-PagerDuty-Signature`
//! holds one or more comma-separated `v1=<hex HMAC-SHA256(secret, body)>`
//! (several during a secret rotation); one must match, compared in constant
//! time, or the answer is 401 and nothing changes. `incident.acknowledged`
//! and `incident.resolved` for an incident we opened acknowledge the group
//! in the store: chat shows who acknowledged in PagerDuty, and escalation
//! stops. Other events and other incidents get 200 and change nothing.
//!
//! A signed event is still only acted on when (issue 20, finding 8):
//! - its `incident_key` is exactly a dedup key gpuops sent for that group
//!   (`gpuops/<group>/<destination>`, as the store recorded it with the
//!   group's PagerDuty message), not merely one that starts like one;
//! - its `occurred_at` is at most [`MAX_AGE_SECS`] old (and at most
//!   [`MAX_AHEAD_SECS`] ahead of our clock);
//! - its `event.id` was not seen before (the store's replay keys, so a
//!   replay after a restart or at another replica is caught too).
//!
//! An event failing one of these is answered 200 (PagerDuty must not retry
//! it), logged and counted in `gpuops_pagerduty_webhooks_ignored_total`
//! by reason.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use hmac::{Hmac, Mac as _};
use sha2::Sha256;

use crate::bot::state::BotState;

/// The oldest `occurred_at` acted on.
pub const MAX_AGE_SECS: i64 = 300;
/// How far ahead of our clock `occurred_at` may be (clock skew).
pub const MAX_AHEAD_SECS: i64 = 60;
/// How long a webhook's `event.id` is remembered: longer than an event
/// stays fresh, so a replay is either stale or remembered.
const REPLAY_KEEP_SECS: i64 = 2 * (MAX_AGE_SECS + MAX_AHEAD_SECS);

/// Why a verified webhook changed nothing (the metric's `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ignored {
    /// `occurred_at` missing, unreadable, too old or too far ahead.
    Stale,
    /// No `event.id`.
    NoEventId,
    /// The `event.id` was seen before.
    Replayed,
    /// The incident key is not one gpuops sent.
    UnknownIncident,
}

impl Ignored {
    pub fn as_str(self) -> &'static str {
        match self {
            Ignored::Stale => "stale",
            Ignored::NoEventId => "no_event_id",
            Ignored::Replayed => "replayed",
            Ignored::UnknownIncident => "unknown_incident",
        }
    }
}

/// Whether `occurred_at` (RFC 3339) is fresh at `now` (Unix seconds).
pub fn is_fresh(occurred_at: &str, now: i64) -> bool {
    match chrono::DateTime::parse_from_rfc3339(occurred_at.trim()) {
        Ok(t) => {
            let t = t.timestamp();
            t >= now - MAX_AGE_SECS && t <= now + MAX_AHEAD_SECS
        }
        Err(_) => false,
    }
}

/// The replay key of a webhook event id.
fn replay_key(event_id: &str) -> [u8; 32] {
    use sha2::Digest as _;
    let mut h = Sha256::new();
    h.update(b"pagerduty-webhook\n");
    h.update(event_id.as_bytes());
    h.finalize().into()
}

fn ignore(state: &BotState, why: Ignored, kind: &str, event_id: &str) -> Response {
    state
        .metrics
        .pagerduty_webhooks_ignored
        .with_label_values(&[why.as_str()])
        .inc();
    let id: String = event_id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
        .take(64)
        .collect();
    tracing::warn!(reason = why.as_str(), event = kind, event_id = %id, "pagerduty webhook ignored");
    (StatusCode::OK, format!("ignored: {}\n", why.as_str())).into_response()
}

/// Whether `header` carries a valid v1 signature of `body` under `secret`.
pub fn verify(secret: &[u8], body: &[u8], header: &str) -> bool {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return false;
    };
    mac.update(body);
    let want = mac.finalize().into_bytes();
    let mut ok = false;
    for part in header.split(',') {
        if let Some(hex_sig) = part.trim().strip_prefix("v1=") {
            if let Ok(sig) = hex::decode(hex_sig.trim()) {
                // No early exit: every signature is compared.
                ok |= crate::alert::constant_time_eq(&sig, &want);
            }
        }
    }
    ok
}

/// The v1 signature header value of `body` (tests, fakes).
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(body);
    format!("v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// Our group id behind a PagerDuty incident key (`gpuops/<group>/<dest>`).
pub fn group_of(incident_key: &str) -> Option<i64> {
    let mut parts = incident_key.split('/');
    match (parts.next(), parts.next(), parts.next()) {
        (Some("gpuops"), Some(id), Some(_)) => id.parse().ok(),
        _ => None,
    }
}

pub async fn receive(
    State(state): State<Arc<BotState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(secret) = &state.config.pagerduty.webhook_secret else {
        return (StatusCode::NOT_FOUND, "not found\n").into_response();
    };
    let sig = headers
        .get("x-pagerduty-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !verify(secret.expose().as_bytes(), &body, sig) {
        tracing::warn!("pagerduty webhook with a missing or wrong signature refused");
        return (StatusCode::UNAUTHORIZED, "bad signature\n").into_response();
    }
    let v: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return (StatusCode::BAD_REQUEST, format!("not JSON: {e}\n")).into_response();
        }
    };
    let ev = &v["event"];
    let kind = ev["event_type"].as_str().unwrap_or("");
    let resolved = match kind {
        "incident.acknowledged" => false,
        "incident.resolved" => true,
        _ => return (StatusCode::OK, "ignored\n").into_response(),
    };
    let event_id = ev["id"].as_str().unwrap_or("");
    let now = chrono::Utc::now().timestamp();
    if !is_fresh(ev["occurred_at"].as_str().unwrap_or(""), now) {
        return ignore(&state, Ignored::Stale, kind, event_id);
    }
    if event_id.is_empty() {
        return ignore(&state, Ignored::NoEventId, kind, event_id);
    }
    let key = ev["data"]["incident_key"]
        .as_str()
        .or_else(|| ev["data"]["dedup_key"].as_str())
        .unwrap_or("");
    let Some(group_id) = group_of(key) else {
        return (StatusCode::OK, "not a gpuops incident\n").into_response();
    };
    // The whole key must be one we sent: the notifier stores it as the
    // message id, `<dedup key>|<last action>`.
    match state.store.messages(group_id).await {
        Ok(messages) => {
            let sent = messages
                .iter()
                .any(|m| m.message_id.split_once('|').map(|(d, _)| d) == Some(key));
            if !sent {
                return ignore(&state, Ignored::UnknownIncident, kind, event_id);
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot read the messages of a PagerDuty webhook's group");
            return (StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n").into_response();
        }
    }
    // Recorded before acting: a store failure below answers 503 and
    // PagerDuty's retry is then ignored as a replay (escalation goes on,
    // which errs on the side of paging).
    match state
        .store
        .first_use(replay_key(event_id), now, REPLAY_KEEP_SECS)
        .await
    {
        Ok(true) => {}
        Ok(false) => return ignore(&state, Ignored::Replayed, kind, event_id),
        Err(e) => {
            tracing::error!(error = %e, "cannot record a PagerDuty webhook's id");
            return (StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n").into_response();
        }
    }
    let agent: String = ev["agent"]["summary"]
        .as_str()
        .unwrap_or("someone")
        .chars()
        .filter(|c| !c.is_control())
        .take(80)
        .collect();
    match state.store.group(group_id).await {
        Ok(Some(g)) if g.ack.is_none() => {
            let who = if resolved {
                format!("{agent} (resolved in PagerDuty)")
            } else {
                format!("{agent} (PagerDuty)")
            };
            match state.outbox.acknowledge(group_id, &who).await {
                Ok(true) => {
                    state
                        .metrics
                        .acknowledgements
                        .with_label_values(&["pagerduty"])
                        .inc();
                    tracing::info!(group_id, by = %who, "acknowledged from PagerDuty");
                    let _ = state
                        .store
                        .audit(
                            "pagerduty".to_string(),
                            "ack".to_string(),
                            serde_json::json!({ "event": kind, "agent": agent }),
                            Some(format!("#{group_id}")),
                            "ok".to_string(),
                        )
                        .await;
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(error = %e, "cannot record a PagerDuty acknowledgement");
                    return (StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n")
                        .into_response();
                }
            }
        }
        Ok(_) => {}
        Err(e) => {
            tracing::error!(error = %e, "cannot read the group of a PagerDuty webhook");
            return (StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n").into_response();
        }
    }
    (StatusCode::OK, "ok\n").into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_valid_wrong_and_rotated() {
        let body = br#"{"event":{}}"#;
        let good = sign(b"new-secret", body);
        assert!(verify(b"new-secret", body, &good));
        assert!(!verify(b"other", body, &good));
        assert!(!verify(b"new-secret", b"tampered", &good));
        let old = sign(b"old-secret", body);
        let rotated = format!("{old}, {good}");
        assert!(verify(b"new-secret", body, &rotated));
        assert!(verify(b"old-secret", body, &rotated));
        assert!(!verify(b"new-secret", body, "v0=abcd, v1=zz"));
        assert!(!verify(b"new-secret", body, ""));
        assert_eq!(group_of("gpuops/12/0a1b2c"), Some(12));
        assert_eq!(group_of("other/12/x"), None);
    }

    #[test]
    fn freshness_of_occurred_at() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-12-03T08:00:00Z")
            .unwrap()
            .timestamp();
        assert!(is_fresh("2026-12-03T08:00:00Z", now));
        assert!(is_fresh("2026-12-03T07:55:00Z", now));
        assert!(is_fresh("2026-12-03T08:00:59.123Z", now));
        assert!(is_fresh("2026-12-03T09:00:30+01:00", now));
        assert!(!is_fresh("2026-12-03T07:54:59Z", now));
        assert!(!is_fresh("2026-12-03T08:01:01Z", now));
        assert!(!is_fresh("", now));
        assert!(!is_fresh("yesterday", now));
        assert_ne!(replay_key("a"), replay_key("b"));
    }
}
