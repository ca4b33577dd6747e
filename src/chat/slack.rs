//! Slack's side of chat: `POST /slack/commands` (slash commands,
//! form-encoded) and `POST /slack/interactions` (button presses: a form field
//! `payload` holding `block_actions` JSON).
//!
//! The v0 signature (signing secret, 5-minute window) and the replay cache
//! (keyed on the signed timestamp and body, not the signature's spelling)
//! are checked on the raw body before anything is parsed; a request that
//! fails gets 401 and changes nothing. Commands are answered in the HTTP
//! response (ephemeral or in-channel JSON); longer work answers later through
//! the request's `response_url`. Button presses are answered 200 at once and
//! followed up through `response_url`. No other module speaks this format.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use crate::chat::{
    handle_button, handle_command, respond, ButtonAction, ChatState, Outcome, Platform, Reply,
    Responder, User, Visibility,
};
use crate::notify::{
    SLACK_ACTION_ACK, SLACK_ACTION_APPROVE, SLACK_ACTION_DENY, SLACK_ACTION_RUN_RUNBOOK,
    SLACK_ACTION_SILENCE_1H,
};
use crate::signing::{self, SLACK_TIMESTAMP};

/// `POST /slack/commands`.
pub async fn commands(
    State(chat): State<Arc<ChatState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(refusal) = verify(&chat, &headers, &body).await {
        return refusal;
    }
    let form = parse_form(&body);
    let user_id = form.get("user_id").cloned().unwrap_or_default();
    if !is_slack_id(&user_id) {
        return bad_request("user_id is missing or malformed");
    }
    let user = User {
        platform: Platform::Slack,
        id: user_id,
        name: form
            .get("user_name")
            .map(|n| crate::notify::truncate_chars(n, 64))
            .unwrap_or_default(),
    };
    let text = form.get("text").cloned().unwrap_or_default();
    let responder = match form.get("response_url") {
        Some(u) if u.starts_with("https://") || u.starts_with("http://") => Responder::Slack {
            response_url: u.clone(),
        },
        _ => Responder::None,
    };
    match handle_command(&chat, &user, &text, responder).await {
        Outcome::Now(reply) => answer(&reply),
        Outcome::Later { ack, work } => {
            tokio::spawn(work);
            answer(&ack)
        }
    }
}

/// `POST /slack/interactions`.
pub async fn interactions(
    State(chat): State<Arc<ChatState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(refusal) = verify(&chat, &headers, &body).await {
        return refusal;
    }
    let form = parse_form(&body);
    let Some(payload) = form.get("payload") else {
        return bad_request("form field payload is missing");
    };
    let p: Interaction = match serde_json::from_str(payload) {
        Ok(p) => p,
        Err(e) => return bad_request(&format!("payload is not an interaction: {e}")),
    };
    if p.kind != "block_actions" {
        tracing::debug!(kind = %p.kind, "slack interaction ignored");
        return StatusCode::OK.into_response();
    }
    if !is_slack_id(&p.user.id) {
        return bad_request("user.id is missing or malformed");
    }
    let user = User {
        platform: Platform::Slack,
        id: p.user.id.clone(),
        name: crate::notify::truncate_chars(
            p.user
                .username
                .as_deref()
                .or(p.user.name.as_deref())
                .unwrap_or(""),
            64,
        ),
    };
    let responder = match &p.response_url {
        Some(u) if u.starts_with("https://") || u.starts_with("http://") => Responder::Slack {
            response_url: u.clone(),
        },
        _ => Responder::None,
    };
    let Some(action) = p.actions.first().and_then(button_action) else {
        tracing::debug!("slack interaction without a gpuops action ignored");
        return StatusCode::OK.into_response();
    };
    // Slack wants 200 within 3 s; everything visible goes through response_url.
    let outcome = handle_button(&chat, &user, action, responder.clone()).await;
    let chat2 = chat.clone();
    tokio::spawn(async move {
        match outcome {
            Outcome::Now(reply) => respond(&chat2, &responder, &reply).await,
            Outcome::Later { ack, work } => {
                respond(&chat2, &responder, &ack).await;
                work.await
            }
        }
    });
    StatusCode::OK.into_response()
}

/// Maps a Slack block action to a button (the ids are the bot's contract).
pub fn button_action(a: &Action) -> Option<ButtonAction> {
    let value = a.value.as_deref().unwrap_or("");
    match a.action_id.as_str() {
        SLACK_ACTION_ACK => value.parse().ok().map(|group| ButtonAction::Ack { group }),
        SLACK_ACTION_SILENCE_1H => value
            .parse()
            .ok()
            .map(|group| ButtonAction::Silence1h { group }),
        SLACK_ACTION_RUN_RUNBOOK => {
            let (g, rb) = value.split_once('|')?;
            let group = g.parse().ok()?;
            crate::runbook::is_runbook_id(rb).then(|| ButtonAction::Run {
                group,
                runbook: rb.to_string(),
            })
        }
        SLACK_ACTION_APPROVE => {
            crate::chat::approvals::is_run_id(value).then(|| ButtonAction::Approve {
                run: value.to_string(),
            })
        }
        SLACK_ACTION_DENY => crate::chat::approvals::is_run_id(value).then(|| ButtonAction::Deny {
            run: value.to_string(),
        }),
        _ => None,
    }
}

/// The parts of a `block_actions` payload we read.
#[derive(Debug, Deserialize)]
pub struct Interaction {
    #[serde(rename = "type")]
    pub kind: String,
    pub user: SlackUser,
    #[serde(default)]
    pub response_url: Option<String>,
    #[serde(default)]
    pub actions: Vec<Action>,
}

#[derive(Debug, Deserialize)]
pub struct SlackUser {
    pub id: String,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct Action {
    pub action_id: String,
    #[serde(default)]
    pub value: Option<String>,
}

/// `None` when the request is signed, fresh and new; else the 401 to send
/// (or the "storage unavailable" answer when the replay cache cannot be read).
async fn verify(chat: &ChatState, headers: &HeaderMap, body: &[u8]) -> Option<Response> {
    let Some(secret) = chat
        .bot
        .config
        .slack
        .as_ref()
        .and_then(|s| s.signing_secret.as_ref())
    else {
        tracing::warn!("slack request refused: no [slack] signing_secret configured");
        return Some(unauthorized());
    };
    if let Err(e) = signing::verify_slack(secret.expose().as_bytes(), headers, body, chat.now()) {
        tracing::warn!(reason = %e, "slack request refused");
        return Some(unauthorized());
    }
    let ts = headers
        .get(SLACK_TIMESTAMP)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    match chat.first_use(Platform::Slack, ts, body).await {
        Ok(true) => None,
        Ok(false) => {
            tracing::warn!(reason = "replayed", "slack request refused");
            Some(unauthorized())
        }
        // Slack shows a 200's text to the user; a 5xx would say only "failed".
        Err(why) => Some(
            Json(serde_json::json!({ "response_type": "ephemeral", "text": why })).into_response(),
        ),
    }
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        Json(serde_json::json!({ "error": "invalid or missing request signature" })),
    )
        .into_response()
}

fn bad_request(msg: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(serde_json::json!({ "error": msg })),
    )
        .into_response()
}

fn answer(reply: &Reply) -> Response {
    Json(serde_json::json!({
        "response_type": match reply.visibility {
            Visibility::Ephemeral => "ephemeral",
            Visibility::InChannel => "in_channel",
        },
        "text": crate::chat::slack_escape(&crate::notify::truncate_chars(&reply.text, Platform::Slack.text_limit())),
    }))
    .into_response()
}

/// Parses `application/x-www-form-urlencoded` (first value of each key).
fn parse_form(body: &[u8]) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for pair in body.split(|b| *b == b'&') {
        if pair.is_empty() {
            continue;
        }
        let (k, v) = match pair.iter().position(|b| *b == b'=') {
            Some(i) => (&pair[..i], &pair[i + 1..]),
            None => (pair, &b""[..]),
        };
        out.entry(percent_decode(k))
            .or_insert_with(|| percent_decode(v));
    }
    out
}

fn percent_decode(s: &[u8]) -> String {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < s.len() => match hex::decode(&s[i + 1..i + 3]) {
                Ok(b) => {
                    out.extend_from_slice(&b);
                    i += 2;
                }
                Err(_) => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn is_slack_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 32 && s.bytes().all(|b| b.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_decode() {
        let f = parse_form(b"text=silence+a%3D%22b%22+1h&user_id=U1&empty=&user_id=U2&bad=%zz%4");
        assert_eq!(f["text"], "silence a=\"b\" 1h");
        assert_eq!(f["user_id"], "U1");
        assert_eq!(f["empty"], "");
        assert_eq!(f["bad"], "%zz%4");
    }

    #[test]
    fn button_values_follow_the_contract() {
        let a = |id: &str, v: &str| Action {
            action_id: id.into(),
            value: Some(v.into()),
        };
        assert_eq!(
            button_action(&a("gpuops_run_runbook", "7|gpu-xid")),
            Some(ButtonAction::Run {
                group: 7,
                runbook: "gpu-xid".into()
            })
        );
        assert_eq!(
            button_action(&a("gpuops_ack", "7")),
            Some(ButtonAction::Ack { group: 7 })
        );
        assert_eq!(
            button_action(&a("gpuops_silence_1h", "7")),
            Some(ButtonAction::Silence1h { group: 7 })
        );
        assert_eq!(
            button_action(&a("gpuops_approve", "r0a1b2c")),
            Some(ButtonAction::Approve {
                run: "r0a1b2c".into()
            })
        );
        assert_eq!(
            button_action(&a("gpuops_deny", "r0a1b2c")),
            Some(ButtonAction::Deny {
                run: "r0a1b2c".into()
            })
        );
        assert_eq!(button_action(&a("gpuops_approve", "7|x")), None);
        assert_eq!(button_action(&a("gpuops_run_runbook", "7|../x")), None);
        assert_eq!(button_action(&a("other", "7")), None);
    }
}
