//! `POST /pagerduty/webhook`: PagerDuty's v3 webhooks back to the bot
//! (served when `[pagerduty] webhook_secret(_file)` is set; 404 otherwise).
//!
//! The raw body is verified before anything is parsed: `X-PagerDuty-Signature`
//! holds one or more comma-separated `v1=<hex HMAC-SHA256(secret, body)>`
//! (several during a secret rotation); one must match, compared in constant
//! time, or the answer is 401 and nothing changes. `incident.acknowledged`
//! and `incident.resolved` for an incident we opened (its `incident_key` is
//! our dedup key `gpuops/<group>/<destination>`) acknowledge the group in
//! the store: chat shows who acknowledged in PagerDuty, and escalation
//! stops. Other events and other incidents get 200 and change nothing.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use hmac::{Hmac, Mac as _};
use sha2::Sha256;

use crate::bot::state::BotState;

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
    let key = ev["data"]["incident_key"]
        .as_str()
        .or_else(|| ev["data"]["dedup_key"].as_str())
        .unwrap_or("");
    let Some(group_id) = group_of(key) else {
        return (StatusCode::OK, "not a gpuops incident\n").into_response();
    };
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
}
