//! Discord's side of chat: `POST /discord/interactions` (the application's
//! interactions endpoint URL).
//!
//! The Ed25519 signature (application public key, over timestamp + body,
//! timestamp within 5 minutes) and the replay cache (keyed on the signed
//! timestamp and body, not the signature's spelling) are checked on the raw
//! body before anything is parsed; a failure gets 401 and changes nothing.
//! PING (type 1) is answered `{"type":1}`; APPLICATION_COMMAND (type 2,
//! `/gpuops command:<text>`) and MESSAGE_COMPONENT (type 3, the alert
//! buttons' `custom_id`s) are answered with a message (type 4), or deferred
//! (type 5) and completed through the interaction webhook
//! (`PATCH/POST <api_url>/api/v10/webhooks/<application_id>/<token>`).
//! No other module speaks this format.

use std::sync::atomic::AtomicBool;
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
use crate::signing::{self, DiscordKey, DISCORD_TIMESTAMP};

/// Interaction types.
pub const PING: u8 = 1;
pub const APPLICATION_COMMAND: u8 = 2;
pub const MESSAGE_COMPONENT: u8 = 3;
/// Response types.
pub const PONG: u8 = 1;
pub const CHANNEL_MESSAGE: u8 = 4;
pub const DEFERRED_CHANNEL_MESSAGE: u8 = 5;
/// Message flag: only the user who asked sees it.
pub const EPHEMERAL: u64 = 64;

/// The command registered with Discord (see README.md, "Set up Slack and Discord").
pub fn command_definition() -> serde_json::Value {
    serde_json::json!({
        "name": "gpuops",
        "type": 1,
        "description": "GPU cluster operations: alerts, silences, runbooks",
        "options": [{
            "type": 3,
            "name": "command",
            "description": "e.g. help, status, alerts, ack 12, silence GpuXid 1h, run gpu-xid alert=12",
            "required": false
        }]
    })
}

/// `POST /discord/interactions`.
pub async fn interactions(
    State(chat): State<Arc<ChatState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(dc) = chat.bot.config.discord.as_ref() else {
        tracing::warn!("discord interaction refused: no [discord] section configured");
        return unauthorized();
    };
    let Some(key_bytes) = dc.public_key else {
        tracing::warn!("discord interaction refused: no [discord] public_key configured");
        return unauthorized();
    };
    let key = match ed25519_dalek::VerifyingKey::from_bytes(&key_bytes) {
        Ok(k) => DiscordKey::from_verifying_key(k),
        Err(e) => {
            tracing::error!(error = %e, "[discord] public_key is not an Ed25519 key");
            return unauthorized();
        }
    };
    if let Err(e) = signing::verify_discord(&key, &headers, &body, chat.now()) {
        tracing::warn!(reason = %e, "discord interaction refused");
        return unauthorized();
    }
    let ts = headers
        .get(DISCORD_TIMESTAMP)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    match chat.first_use(Platform::Discord, ts, &body).await {
        Ok(true) => {}
        Ok(false) => {
            tracing::warn!(reason = "replayed", "discord interaction refused");
            return unauthorized();
        }
        // An ephemeral message in reply to the interaction.
        Err(why) => {
            return Json(serde_json::json!({
                "type": 4,
                "data": { "content": why, "flags": 64 }
            }))
            .into_response()
        }
    }
    let i: Interaction = match serde_json::from_slice(&body) {
        Ok(i) => i,
        Err(e) => return bad_request(&format!("not a Discord interaction: {e}")),
    };
    if i.kind == PING {
        return Json(serde_json::json!({ "type": PONG })).into_response();
    }
    let Some(u) = i
        .member
        .as_ref()
        .and_then(|m| m.user.as_ref())
        .or(i.user.as_ref())
    else {
        return bad_request("interaction names no user");
    };
    if u.id.is_empty() || u.id.len() > 24 || !u.id.bytes().all(|b| b.is_ascii_digit()) {
        return bad_request("user id is malformed");
    }
    let user = User {
        platform: Platform::Discord,
        id: u.id.clone(),
        name: crate::notify::truncate_chars(u.username.as_deref().unwrap_or(""), 64),
    };
    let application_id = if !i.application_id.is_empty() {
        i.application_id.clone()
    } else {
        dc.application_id.map(|a| a.to_string()).unwrap_or_default()
    };
    let responder = if i.token.is_empty()
        || application_id.is_empty()
        || !application_id.bytes().all(|b| b.is_ascii_digit())
        || !i
            .token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        Responder::None
    } else {
        Responder::Discord {
            api_url: dc.api_url.clone(),
            application_id,
            token: i.token.clone(),
            original_pending: Arc::new(AtomicBool::new(true)),
        }
    };
    let data = i.data.unwrap_or_default();
    let outcome = match i.kind {
        APPLICATION_COMMAND => {
            let text = command_text(&data);
            handle_command(&chat, &user, &text, responder.clone()).await
        }
        MESSAGE_COMPONENT => match button_action(data.custom_id.as_deref().unwrap_or("")) {
            Some(a) => handle_button(&chat, &user, a, responder.clone()).await,
            None => Outcome::Now(Reply::private("unknown button")),
        },
        other => return bad_request(&format!("interaction type {other} is not handled")),
    };
    match outcome {
        Outcome::Now(reply) => message(&reply),
        Outcome::Later { ack, work } => {
            let ephemeral = ack.visibility == Visibility::Ephemeral;
            let chat2 = chat.clone();
            tokio::spawn(async move {
                // Replaces "thinking…" with the acknowledgement, then works.
                respond(&chat2, &responder, &ack).await;
                work.await
            });
            let mut resp = serde_json::json!({ "type": DEFERRED_CHANNEL_MESSAGE });
            if ephemeral {
                resp["data"] = serde_json::json!({ "flags": EPHEMERAL });
            }
            Json(resp).into_response()
        }
    }
}

/// Maps a component `custom_id` to a button (the bot's contract).
pub fn button_action(custom_id: &str) -> Option<ButtonAction> {
    let parts: Vec<&str> = custom_id.split(':').collect();
    match parts.as_slice() {
        ["gpuops", "ack", g] => g.parse().ok().map(|group| ButtonAction::Ack { group }),
        ["gpuops", "silence", g, "1h"] => g
            .parse()
            .ok()
            .map(|group| ButtonAction::Silence1h { group }),
        ["gpuops", "run", g, rb] if crate::runbook::is_runbook_id(rb) => {
            g.parse().ok().map(|group| ButtonAction::Run {
                group,
                runbook: rb.to_string(),
            })
        }
        ["gpuops", "approve", r] if crate::chat::approvals::is_run_id(r) => {
            Some(ButtonAction::Approve { run: r.to_string() })
        }
        ["gpuops", "deny", r] if crate::chat::approvals::is_run_id(r) => {
            Some(ButtonAction::Deny { run: r.to_string() })
        }
        _ => None,
    }
}

/// The text of `/gpuops command:<text>` (or of every string option).
fn command_text(data: &Data) -> String {
    data.options
        .iter()
        .filter_map(|o| o.value.as_ref())
        .map(|v| match v {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[derive(Debug, Deserialize)]
struct Interaction {
    #[serde(rename = "type")]
    kind: u8,
    #[serde(default)]
    application_id: String,
    #[serde(default)]
    token: String,
    #[serde(default)]
    data: Option<Data>,
    #[serde(default)]
    member: Option<Member>,
    #[serde(default)]
    user: Option<DiscordUser>,
}

#[derive(Debug, Default, Deserialize)]
struct Data {
    #[serde(default)]
    options: Vec<CommandOption>,
    #[serde(default)]
    custom_id: Option<String>,
}

#[derive(Debug, Deserialize)]
struct CommandOption {
    #[serde(default)]
    value: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
struct Member {
    #[serde(default)]
    user: Option<DiscordUser>,
}

#[derive(Debug, Deserialize)]
struct DiscordUser {
    id: String,
    #[serde(default)]
    username: Option<String>,
}

fn message(reply: &Reply) -> Response {
    let mut data = serde_json::json!({
        "content": crate::notify::truncate_chars(&reply.text, Platform::Discord.text_limit()),
        "allowed_mentions": { "parse": [] },
    });
    if reply.visibility == Visibility::Ephemeral {
        data["flags"] = serde_json::json!(EPHEMERAL);
    }
    Json(serde_json::json!({ "type": CHANNEL_MESSAGE, "data": data })).into_response()
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        Json(serde_json::json!({ "error": "invalid request signature" })),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn custom_ids_follow_the_contract() {
        assert_eq!(
            button_action("gpuops:ack:7"),
            Some(ButtonAction::Ack { group: 7 })
        );
        assert_eq!(
            button_action("gpuops:silence:7:1h"),
            Some(ButtonAction::Silence1h { group: 7 })
        );
        assert_eq!(
            button_action("gpuops:run:7:gpu-xid"),
            Some(ButtonAction::Run {
                group: 7,
                runbook: "gpu-xid".into()
            })
        );
        assert_eq!(
            button_action("gpuops:approve:r0a1b2c"),
            Some(ButtonAction::Approve {
                run: "r0a1b2c".into()
            })
        );
        assert_eq!(
            button_action("gpuops:deny:r0a1b2c"),
            Some(ButtonAction::Deny {
                run: "r0a1b2c".into()
            })
        );
        assert_eq!(button_action("gpuops:approve:r0A1b2c;x"), None);
        assert_eq!(button_action("gpuops:run:7:../x"), None);
        assert_eq!(button_action("gpuops:silence:7:10y"), None);
    }

    #[test]
    fn command_text_joins_option_values() {
        let d: Data = serde_json::from_str(
            r#"{"name":"gpuops","options":[{"name":"command","type":3,"value":"silence GpuXid 1h"}]}"#,
        )
        .unwrap();
        assert_eq!(command_text(&d), "silence GpuXid 1h");
        assert_eq!(command_text(&Data::default()), "");
    }
}
