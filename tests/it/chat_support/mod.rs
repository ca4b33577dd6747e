//! Shared harness of the chat tests: a bot (store, outbox worker, router
//! with the chat routes) over a config written here, a recording chat
//! platform behind the outbox, a capture server standing in for Slack's
//! `response_url` and Discord's interaction webhooks, and request signers.
//! Test-only code; every wait has a deadline.

#![allow(dead_code)]

pub use crate::support::{free_port, Proc};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::Request;
use ed25519_dalek::Signer as _;
use futures_util::future::BoxFuture;
use gpuops::bot::BotState;
use gpuops::chat::{self, ChatState};
use gpuops::config::BotConfig;
use gpuops::notify::console::ConsoleNotifier;
use gpuops::notify::{Delivery, Error, Message, Notifier, Op, Outgoing, PlatformRef};
use gpuops::outbox::Notifiers;
use gpuops::runbook::engine::StepExecutor;
use gpuops::signing::{self, Clock, FixedClock};
use tower::ServiceExt as _;

pub const SLACK_SECRET: &str = "8f742231b10e8888abcd99yyyzzz85a5";
pub const ADMIN: &str = "U0ADMIN";
pub const ADMIN2: &str = "U0ADMIN2";
pub const OPERATOR: &str = "U0OPER";
pub const STRANGER: &str = "U0STRANGER";

/// One call the recording platform received.
#[derive(Debug, Clone)]
pub struct Call {
    /// `post`, `edit` or `reply`.
    pub op: &'static str,
    pub channel: String,
    pub message: Message,
}

/// A chat platform behind the outbox that records every call.
#[derive(Default)]
pub struct Recorder {
    pub calls: Mutex<Vec<Call>>,
    next: Mutex<u64>,
}

impl Recorder {
    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    /// Texts (and code blocks) of thread replies so far.
    pub fn replies(&self) -> Vec<String> {
        self.calls()
            .into_iter()
            .filter(|c| c.op == "reply")
            .filter_map(|c| match c.message {
                Message::Text(t) => Some(format!("{}\n{}", t.text, t.code.unwrap_or_default())),
                _ => None,
            })
            .collect()
    }
}

impl Notifier for Recorder {
    fn platform(&self) -> &'static str {
        "slack"
    }

    fn send<'a>(&'a self, out: &'a Outgoing<'a>) -> BoxFuture<'a, Result<Delivery, Error>> {
        Box::pin(async move {
            let (op, id) = match &out.op {
                Op::Post => {
                    let mut n = self.next.lock().unwrap();
                    *n += 1;
                    ("post", format!("1700000000.{:06}", *n))
                }
                Op::Edit(p) => ("edit", p.message_id.clone()),
                Op::Reply(p) => ("reply", format!("{}-r", p.message_id)),
            };
            self.calls.lock().unwrap().push(Call {
                op,
                channel: out.channel.to_string(),
                message: out.message.clone(),
            });
            Ok(Delivery {
                message: PlatformRef {
                    channel: out.channel.to_string(),
                    message_id: id,
                },
            })
        })
    }
}

/// A running bot with chat routes.
pub struct Bot {
    pub dir: tempfile::TempDir,
    pub state: Arc<BotState>,
    pub chat: Arc<ChatState>,
    pub router: axum::Router,
    pub slack: Arc<Recorder>,
    pub clock: Arc<FixedClock>,
    pub discord_key: ed25519_dalek::SigningKey,
    stop: tokio::sync::watch::Sender<bool>,
}

/// The config every test starts from; `extra` is appended.
pub fn config_text(dir: &Path, extra: &str) -> String {
    let key = discord_signing_key();
    format!(
        r#"
[store]
path = "{db}"
[slack]
bot_token = "xoxb-test-token"
signing_secret = "{SLACK_SECRET}"
api_url = "http://127.0.0.1:9"
[discord]
bot_token = "discord-test-token"
application_id = "223456789012345678"
public_key = "{pk}"
api_url = "http://127.0.0.1:9"
[[routing.destinations]]
slack_channel = "C0ALERTS"
[rbac]
admins = ["{ADMIN}", "{ADMIN2}", "323456789012345678"]
operators = ["{OPERATOR}", "U0OPER2", "423456789012345678"]
[approvals]
expiry_secs = 600
{extra}
"#,
        db = dir.join("bot.db").display(),
        pk = hex::encode(key.verifying_key().to_bytes()),
    )
}

/// The Discord application's key pair (fixed seed: the tests sign with it).
pub fn discord_signing_key() -> ed25519_dalek::SigningKey {
    ed25519_dalek::SigningKey::from_bytes(&[7u8; 32])
}

impl Bot {
    /// A bot whose steps run through `executor` (or the production one).
    pub async fn start(extra: &str, executor: Option<Arc<dyn StepExecutor>>) -> Bot {
        let dir = tempfile::tempdir().unwrap();
        Bot::start_in(dir, extra, executor).await
    }

    pub async fn start_in(
        dir: tempfile::TempDir,
        extra: &str,
        executor: Option<Arc<dyn StepExecutor>>,
    ) -> Bot {
        Bot::start_full(dir, extra, executor, None).await
    }

    /// As [`Bot::start_in`], with Discord's API (interaction follow-ups) at
    /// `discord_api`.
    pub async fn start_full(
        dir: tempfile::TempDir,
        extra: &str,
        executor: Option<Arc<dyn StepExecutor>>,
        discord_api: Option<&str>,
    ) -> Bot {
        let mut text = config_text(dir.path(), extra);
        if let Some(api) = discord_api {
            text = text.replace(
                "public_key =",
                &format!("api_url = \"{api}\"\npublic_key ="),
            );
            text = text.replacen(
                "api_url = \"http://127.0.0.1:9\"\n[[routing",
                "\n[[routing",
                1,
            );
        }
        let cfg = BotConfig::from_str(&dir.path().join("bot.toml"), &text).unwrap();
        Bot::start_config(dir, cfg, executor).await
    }

    /// A bot running `cfg` (a whole configuration, e.g. read from a file).
    pub async fn start_config(
        dir: tempfile::TempDir,
        cfg: BotConfig,
        executor: Option<Arc<dyn StepExecutor>>,
    ) -> Bot {
        let cfg = Arc::new(cfg);
        let store = open_store_at(&cfg.store.path).await;
        let slack = Arc::new(Recorder::default());
        let notifiers = Notifiers {
            slack: Some(slack.clone()),
            discord: None,
            webhook: None,
            console: Arc::new(ConsoleNotifier::new()),
            pagerduty: None,
            email: None,
        };
        let (state, worker) = BotState::with_notifiers(cfg, store, notifiers);
        let (stop, rx) = tokio::sync::watch::channel(false);
        let mut wrx = rx.clone();
        tokio::spawn(worker.run(async move {
            let _ = wrx.wait_for(|s| *s).await;
        }));
        let clock = Arc::new(FixedClock::new(signing::SystemClock.now_unix()));
        let chat = match executor {
            Some(e) => ChatState::with_executor(state.clone(), clock.clone(), e),
            None => {
                // The production executor with the test clock.
                let prod = ChatState::new(state.clone());
                ChatState::with_executor(state.clone(), clock.clone(), prod.executor.clone())
                    .with_agents(prod.agents.clone())
            }
        };
        let routes = chat::start(chat.clone(), rx).await;
        let router = gpuops::bot_role::router_with(state.clone(), routes);
        Bot {
            dir,
            state,
            chat,
            router,
            slack,
            clock,
            discord_key: discord_signing_key(),
            stop,
        }
    }

    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    /// Sends a request through the router; returns status and body text.
    pub async fn send(&self, req: Request<Body>) -> (u16, String) {
        let resp = self.router.clone().oneshot(req).await.unwrap();
        let status = resp.status().as_u16();
        let bytes = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap()
            .to_bytes();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    /// A signed `/gpuops <text>` from Slack user `user`.
    pub async fn slack_command(&self, user: &str, text: &str) -> (u16, serde_json::Value) {
        self.slack_command_with_url(user, text, "http://127.0.0.1:9/nowhere")
            .await
    }

    pub async fn slack_command_with_url(
        &self,
        user: &str,
        text: &str,
        response_url: &str,
    ) -> (u16, serde_json::Value) {
        let body = slack_command_body(user, text, response_url);
        let (s, b) = self
            .send(slack_request(
                "/slack/commands",
                &body,
                self.clock.now_unix(),
                SLACK_SECRET,
            ))
            .await;
        (
            s,
            serde_json::from_str(&b).unwrap_or(serde_json::Value::String(b)),
        )
    }

    /// Ingests an AlertManager webhook; returns the group id.
    pub async fn alert(&self, hook: serde_json::Value) -> i64 {
        let (s, b) = self
            .send(
                Request::post("/alertmanager")
                    .header("content-type", "application/json")
                    .body(Body::from(hook.to_string()))
                    .unwrap(),
            )
            .await;
        assert_eq!(s, 200, "{b}");
        let v: serde_json::Value = serde_json::from_str(&b).unwrap();
        v["group_id"].as_i64().unwrap()
    }

    pub async fn audit(&self) -> Vec<gpuops::store::AuditRecord> {
        self.state.store.audit_since(0.0).await.unwrap()
    }

    /// Waits until `f` holds (or panics after `secs`).
    pub async fn wait_for(&self, secs: u64, what: &str, mut f: impl FnMut(&Bot) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !f(self) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; replies so far: {:#?}",
                self.slack.replies()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The form body Slack sends for a slash command.
pub fn slack_command_body(user: &str, text: &str, response_url: &str) -> String {
    form(&[
        ("token", "legacy-unused"),
        ("team_id", "T0001"),
        ("channel_id", "C0ALERTS"),
        ("user_id", user),
        ("user_name", &user.to_ascii_lowercase()),
        ("command", "/gpuops"),
        ("text", text),
        ("response_url", response_url),
        ("trigger_id", &next_trigger_id()),
    ])
}

/// A fresh trigger id (Slack's differ per request, so do ours).
pub fn next_trigger_id() -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    format!(
        "13345224609.738474920.{}",
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

/// The form body Slack sends when a button is pressed.
pub fn slack_button_body(user: &str, action_id: &str, value: &str, response_url: &str) -> String {
    let payload = serde_json::json!({
        "type": "block_actions",
        "team": { "id": "T0001", "domain": "gpuops-test" },
        "user": { "id": user, "username": user.to_ascii_lowercase(), "team_id": "T0001" },
        "api_app_id": "A0001",
        "trigger_id": next_trigger_id(),
        "container": { "type": "message", "message_ts": "1700000000.000001", "channel_id": "C0ALERTS" },
        "channel": { "id": "C0ALERTS" },
        "response_url": response_url,
        "actions": [{ "type": "button", "action_id": action_id, "block_id": "b1", "value": value, "action_ts": "1700000001.0" }]
    });
    form(&[("payload", &payload.to_string())])
}

pub fn form(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// A request to `path` signed with `secret` at `ts`.
pub fn slack_request(path: &str, body: &str, ts: i64, secret: &str) -> Request<Body> {
    Request::post(path)
        .header("content-type", "application/x-www-form-urlencoded")
        .header(signing::SLACK_TIMESTAMP, ts.to_string())
        .header(
            signing::SLACK_SIGNATURE,
            signing::sign_slack(secret.as_bytes(), ts, body.as_bytes()),
        )
        .body(Body::from(body.to_string()))
        .unwrap()
}

/// A Discord interaction signed with `key` at `ts`.
pub fn discord_request(key: &ed25519_dalek::SigningKey, body: &str, ts: i64) -> Request<Body> {
    let mut msg = ts.to_string().into_bytes();
    msg.extend_from_slice(body.as_bytes());
    let sig = key.sign(&msg);
    Request::post("/discord/interactions")
        .header("content-type", "application/json")
        .header(signing::DISCORD_TIMESTAMP, ts.to_string())
        .header(signing::DISCORD_SIGNATURE, hex::encode(sig.to_bytes()))
        .body(Body::from(body.to_string()))
        .unwrap()
}

/// A guild interaction of `kind` (2: slash command, 3: button) from `user`
/// as Discord sends it, with every field serenity's models require; `data`
/// is the interaction's own (a command's `name` and `options`, a button's
/// `custom_id` and `component_type`), completed with the registered
/// command's id and type for a command, and the message the button is on
/// for a button.
pub fn discord_interaction(kind: u8, user: &str, token: &str, data: serde_json::Value) -> String {
    const APP: &str = "223456789012345678";
    const GUILD: &str = "2222222222222222";
    const CHANNEL: &str = "1111111111111111";
    let mut data = data;
    if kind == 2 {
        data["id"] = serde_json::json!("1300000000000000000");
        data["type"] = serde_json::json!(1);
    }
    let mut v = serde_json::json!({
        "type": kind, "id": "5", "application_id": APP, "token": token, "version": 1,
        "app_permissions": "2248473465835073", "attachment_size_limit": 10485760,
        "authorizing_integration_owners": { "0": GUILD },
        "channel_id": CHANNEL, "context": 0, "entitlements": [],
        "guild_id": GUILD, "guild_locale": "en-US", "locale": "en-US",
        "member": {
            "avatar": null, "communication_disabled_until": null, "deaf": false, "flags": 0,
            "joined_at": "2026-01-01T00:00:00.000000+00:00", "mute": false, "nick": null,
            "pending": false, "permissions": "2248473465835073", "premium_since": null,
            "roles": [], "unusual_dm_activity_until": null,
            "user": {
                "avatar": null, "avatar_decoration_data": null, "discriminator": "0",
                "global_name": null, "id": user, "public_flags": 0, "username": format!("u{user}"),
            },
        },
        "data": data,
    });
    if kind == 3 {
        v["message"] = serde_json::json!({
            "id": "1310000000000000000", "channel_id": CHANNEL, "type": 0, "content": "",
            "tts": false, "timestamp": "2026-01-01T00:00:00.000000+00:00",
            "edited_timestamp": null, "mention_everyone": false, "mentions": [],
            "mention_roles": [], "attachments": [], "embeds": [], "pinned": false, "flags": 0,
            "components": [],
            "author": {
                "avatar": null, "bot": true, "discriminator": "0000", "global_name": null,
                "id": APP, "public_flags": 0, "username": "gpuops",
            },
        });
    }
    v.to_string()
}

/// An AlertManager webhook for one firing alert.
pub fn webhook(alertname: &str, instance: &str, extra: &[(&str, &str)]) -> serde_json::Value {
    let mut labels = serde_json::json!({
        "alertname": alertname, "severity": "critical", "instance": instance,
    });
    for (k, v) in extra {
        labels[*k] = serde_json::json!(v);
    }
    serde_json::json!({
        "version": "4",
        "groupKey": format!("{{}}:{{alertname=\"{alertname}\", instance=\"{instance}\"}}"),
        "status": "firing",
        "receiver": "gpuops",
        "groupLabels": { "alertname": alertname, "instance": instance },
        "commonLabels": labels,
        "commonAnnotations": { "summary": format!("{alertname} on {instance}") },
        "externalURL": "http://am:9093",
        "alerts": [{
            "status": "firing",
            "labels": labels,
            "annotations": { "summary": format!("{alertname} on {instance}") },
            "startsAt": "2026-11-22T00:00:00Z",
            "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "http://prom/graph",
            "fingerprint": format!("fp-{alertname}-{instance}")
        }]
    })
}

/// A local HTTP server that records every request (Slack's response_url,
/// Discord's interaction webhook) and answers 200 `{}`.
pub struct Capture {
    pub url: String,
    pub requests: Arc<Mutex<Vec<(String, String, String)>>>,
}

impl Capture {
    pub async fn start() -> Capture {
        let requests: Arc<Mutex<Vec<(String, String, String)>>> = Arc::default();
        let r = requests.clone();
        let app = axum::Router::new().fallback(move |req: Request<Body>| {
            let r = r.clone();
            async move {
                let method = req.method().to_string();
                let path = req.uri().path().to_string();
                let bytes = http_body_util::BodyExt::collect(req.into_body())
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                r.lock().unwrap().push((
                    method,
                    path,
                    String::from_utf8_lossy(&bytes).into_owned(),
                ));
                axum::Json(serde_json::json!({}))
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Capture {
            url: format!("http://{addr}"),
            requests,
        }
    }

    pub fn bodies(&self) -> Vec<String> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.2.clone())
            .collect()
    }

    pub async fn wait_for(&self, secs: u64, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(b) = self.bodies().into_iter().find(|b| b.contains(needle)) {
                return b;
            }
            assert!(
                Instant::now() < deadline,
                "no request containing {needle:?}; got {:#?}",
                self.requests.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A bot key pair in `dir`: (private key file, public key file, private PEM).
pub fn exec_keys(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, String) {
    use std::os::unix::fs::PermissionsExt as _;
    let signer = gpuops::exec_auth::ExecSigner::generate();
    let key = dir.join("exec.key");
    let pem = signer.private_pem().unwrap().expose().to_string();
    std::fs::write(&key, &pem).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let public = dir.join("exec.pub");
    std::fs::write(&public, signer.public_key().to_pem().unwrap()).unwrap();
    (key, public, pem)
}

// The PostgreSQL switch is the shared test support's (`on_both!` there,
// `chat_on_both!` here).
pub(crate) use crate::support;
use crate::support::open_store_at;

/// Each listed `async fn` becomes a module with two tests: `sqlite`, and
/// `postgres` (ignored in plain `cargo test`; `.ci/run` includes it).
#[macro_export]
macro_rules! chat_on_both {
    ($($case:ident),* $(,)?) => {$(
        mod $case {
            #[tokio::test]
            async fn sqlite() {
                super::$case().await
            }

            #[tokio::test]
            #[ignore = "needs PostgreSQL: run by .ci/run"]
            async fn postgres() {
                super::chat_support::support::on_postgres(super::$case()).await
            }
        }
    )*};
}
