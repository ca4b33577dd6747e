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
//!
//! Bodies are read into serenity's interaction models (`Interaction`,
//! `CommandInteraction`, `ComponentInteraction`); only the verification is
//! ours (a clock that tests set, replay keys kept in the store).

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serenity::all::{
    CommandData, CommandDataOptionValue, CommandOptionType, CommandType, CreateCommand,
    CreateCommandOption, Interaction, User as DiscordUser, UserId,
};

use crate::chat::{
    handle_button, handle_command, respond, ButtonAction, ChatState, Outcome, Platform, Reply,
    Responder, User, Visibility,
};
use crate::signing::{self, DiscordKey, DISCORD_TIMESTAMP};

/// Response types.
pub const PONG: u8 = 1;
pub const CHANNEL_MESSAGE: u8 = 4;
pub const DEFERRED_CHANNEL_MESSAGE: u8 = 5;
/// Message flag: only the user who asked sees it.
pub const EPHEMERAL: u64 = 64;

/// The slash commands `gpuops discord register` registers: `/gpuops` with
/// one optional string option, `command`, holding the same text as Slack's
/// `/gpuops …` (read back by [`command_text`], parsed by the chat grammar).
pub fn slash_commands() -> Vec<CreateCommand> {
    vec![CreateCommand::new("gpuops")
        .kind(CommandType::ChatInput)
        .description("GPU cluster operations: alerts, silences, runbooks")
        .add_option(
            CreateCommandOption::new(
                CommandOptionType::String,
                "command",
                "e.g. help, status, alerts, ack 12, silence GpuXid 1h, run gpu-xid alert=12",
            )
            .required(false),
        )]
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
    let (member, user, token, asked) = match &i {
        Interaction::Ping(_) => {
            return Json(serde_json::json!({ "type": PONG })).into_response();
        }
        Interaction::Command(c) => (
            c.member.as_deref(),
            &c.user,
            &c.token,
            Asked::Command(command_text(&c.data)),
        ),
        Interaction::Component(c) => (
            c.member.as_ref(),
            &c.user,
            &c.token,
            Asked::Button(&c.data.custom_id),
        ),
        other => {
            let kind = u8::from(other.kind());
            return bad_request(&format!("interaction type {kind} is not handled"));
        }
    };
    let Some(u) = interaction_user(member.map(|m| &m.user), user) else {
        return bad_request("interaction names no user");
    };
    let user = User {
        platform: Platform::Discord,
        id: u.id.to_string(),
        name: crate::notify::truncate_chars(&u.name, 64),
    };
    let application_id = i.application_id().to_string();
    let responder = if token.is_empty()
        || !token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        Responder::None
    } else {
        Responder::Discord {
            api_url: dc.api_url.clone(),
            application_id,
            token: token.clone(),
            original_pending: Arc::new(AtomicBool::new(true)),
        }
    };
    let outcome = match asked {
        Asked::Command(text) => handle_command(&chat, &user, &text, responder.clone()).await,
        Asked::Button(custom_id) => match button_action(custom_id) {
            Some(a) => handle_button(&chat, &user, a, responder.clone()).await,
            None => Outcome::Now(Reply::private("unknown button")),
        },
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
        ["gpuops", "approve", r] if crate::chat::approvals::is_button_value(r) => {
            Some(ButtonAction::Approve { run: r.to_string() })
        }
        ["gpuops", "deny", r] if crate::chat::approvals::is_button_value(r) => {
            Some(ButtonAction::Deny { run: r.to_string() })
        }
        _ => None,
    }
}

/// The text of `/gpuops command:<text>` (or of every option that has a
/// value, joined by spaces; numbers and ids as Discord wrote them).
fn command_text(data: &CommandData) -> String {
    data.options
        .iter()
        .filter_map(|o| match &o.value {
            CommandDataOptionValue::String(s) => Some(s.clone()),
            CommandDataOptionValue::Autocomplete { value, .. } => Some(value.clone()),
            CommandDataOptionValue::Integer(n) => Some(n.to_string()),
            CommandDataOptionValue::Number(n) => Some(serde_json::Value::from(*n).to_string()),
            CommandDataOptionValue::Boolean(b) => Some(b.to_string()),
            CommandDataOptionValue::Attachment(id) => Some(id.to_string()),
            CommandDataOptionValue::Channel(id) => Some(id.to_string()),
            CommandDataOptionValue::Mentionable(id) => Some(id.to_string()),
            CommandDataOptionValue::Role(id) => Some(id.to_string()),
            CommandDataOptionValue::User(id) => Some(id.to_string()),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// What an interaction asks for.
enum Asked<'a> {
    /// `/gpuops <text>`.
    Command(String),
    /// A button's `custom_id`.
    Button(&'a str),
}

/// Who pressed or typed: the guild member's user, else the DM's `user`.
/// serenity fills an absent `user` with its default (id 1, no name), which
/// no Discord account has, so that reads as no user at all.
fn interaction_user<'a>(
    member: Option<&'a DiscordUser>,
    user: &'a DiscordUser,
) -> Option<&'a DiscordUser> {
    member.or(Some(user)).filter(|u| u.id != UserId::default())
}

fn message(reply: &Reply) -> Response {
    let mut data = serde_json::json!({
        "content": crate::notify::discord::reply_content(&crate::notify::truncate_chars(&reply.text, Platform::Discord.text_limit())),
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
    fn user_is_the_members_else_the_dms_else_none() {
        let parse = |who: &str| -> Interaction {
            serde_json::from_str(&format!(
                r#"{{"type":2,"id":"5","application_id":"223456789012345678","token":"t","version":1,
                "attachment_size_limit":10485760,"channel_id":"1111111111111111","context":1,
                "entitlements":[],"locale":"en-US",{who}
                "data":{{"id":"1300000000000000000","name":"gpuops","type":1}}}}"#
            ))
            .unwrap()
        };
        let who = |i: &Interaction| {
            let c = i.as_command().unwrap();
            interaction_user(c.member.as_deref().map(|m| &m.user), &c.user)
                .map(|u| (u.id.to_string(), u.name.clone()))
        };
        let dm = parse(
            r#""user":{"id":"423456789012345678","username":"oper","discriminator":"0","global_name":null,"avatar":null},"#,
        );
        assert_eq!(who(&dm), Some(("423456789012345678".into(), "oper".into())));
        assert_eq!(who(&parse("")), None);
    }

    #[test]
    fn command_text_joins_option_values() {
        let d: CommandData = serde_json::from_str(
            r#"{"id":"1300000000000000000","name":"gpuops","type":1,"options":[{"name":"command","type":3,"value":"silence GpuXid 1h"}]}"#,
        )
        .unwrap();
        assert_eq!(command_text(&d), "silence GpuXid 1h");
        let none: CommandData =
            serde_json::from_str(r#"{"id":"1300000000000000000","name":"gpuops","type":1}"#)
                .unwrap();
        assert_eq!(command_text(&none), "");
    }
}
