//! Chat commands and buttons: the `/gpuops` command language, its parser,
//! who may do what, and the dispatch shared by Slack (`slack.rs`) and Discord
//! (`discord.rs`); runbook runs and their approvals live in `approvals.rs`.
//!
//! Every request is verified by the platform module before anything here
//! runs. Quick commands are answered inline; work that may take longer
//! (AlertManager calls, runbook runs) is acknowledged at once and continues
//! in a task that answers through a [`Responder`] (Slack `response_url`,
//! Discord follow-ups) or the alert's thread (the bot's outbox). Every
//! command, approval, denial and step is written to the audit log. This
//! module speaks no platform wire format and runs no process itself.

pub mod approvals;
pub mod discord;
mod grammar;
mod handlers;
pub mod slack;
pub mod timeline;

use grammar::*;
pub use grammar::{parse_command, ButtonAction, Command, USAGE};
use handlers::*;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::post;
use axum::Router;
use serde::{Deserialize, Serialize};

use crate::alert::{self, Links, Webhook};
use crate::alertmanager::{self, Matcher};
use crate::bot::state::BotState;
use crate::inventory::NodeNames;
use crate::notify::{self, Message};
use crate::rbac::{authorize, ChatAction};
use crate::runbook::engine::{
    AgentDirectory, Executor, NodeSteps, PlannedStep, RunPlan, StepExecutor, StepOutcome,
};
use crate::runbook::exec::ProcessRunner;
use crate::runbook::{Role, RunbookSet};
use crate::signing::{Clock, SystemClock, WINDOW_SECS};
use crate::store::GroupRecord;

/// Most characters of step output shown in a chat message (both platforms'
/// limits leave room for the header around it).
pub const OUTPUT_CHARS: usize = 1500;
/// Largest chat request body read.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Longest an inline answer may wait on AlertManager (the platforms give 3 s).
pub const INLINE_DEADLINE: Duration = Duration::from_millis(1500);
/// Longest a deferred answer (response_url, follow-up) may take.
pub const RESPOND_TIMEOUT: Duration = Duration::from_secs(10);

/// Which chat platform a request came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Platform {
    Slack,
    Discord,
}

impl Platform {
    pub fn as_str(self) -> &'static str {
        match self {
            Platform::Slack => "slack",
            Platform::Discord => "discord",
        }
    }

    /// Longest text one answer may carry.
    pub fn text_limit(self) -> usize {
        match self {
            Platform::Slack => 3000,
            Platform::Discord => 2000,
        }
    }
}

/// Someone in chat, as the verified request names them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub platform: Platform,
    /// The platform's user id (`U0123`, a Discord snowflake).
    pub id: String,
    /// Their handle, for messages (may be empty).
    pub name: String,
}

impl User {
    /// `slack:U0123`: what the audit log and approvals store.
    pub fn key(&self) -> String {
        format!("{}:{}", self.platform.as_str(), self.id)
    }

    /// `alice (slack:U0123)` or the key alone.
    pub fn display(&self) -> String {
        if self.name.is_empty() {
            self.key()
        } else {
            format!("{} ({})", self.name, self.key())
        }
    }
}

/// Who may see an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Visibility {
    /// Only the person who asked.
    Ephemeral,
    /// Everyone in the channel.
    InChannel,
}

/// A text answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub text: String,
    pub visibility: Visibility,
}

impl Reply {
    pub fn private(text: impl Into<String>) -> Reply {
        Reply {
            text: text.into(),
            visibility: Visibility::Ephemeral,
        }
    }

    pub fn public(text: impl Into<String>) -> Reply {
        Reply {
            text: text.into(),
            visibility: Visibility::InChannel,
        }
    }
}

/// What a request comes to: an answer now, or an acknowledgement now and
/// work that continues (and answers through the [`Responder`]).
pub enum Outcome {
    Now(Reply),
    Later {
        ack: Reply,
        work: Pin<Box<dyn Future<Output = ()> + Send + 'static>>,
    },
}

/// Where answers sent after the first go: Slack's `response_url`, Discord's
/// interaction webhook. Holds short-lived tokens: never logged or stored.
#[derive(Clone)]
pub enum Responder {
    Slack {
        response_url: String,
    },
    Discord {
        api_url: String,
        application_id: String,
        token: String,
        /// The first follow-up replaces the deferred "thinking…" message.
        original_pending: Arc<std::sync::atomic::AtomicBool>,
    },
    /// Nowhere (tests, runs resumed by the expiry task).
    None,
}

impl std::fmt::Debug for Responder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Responder::Slack { .. } => "Responder::Slack(<redacted>)",
            Responder::Discord { .. } => "Responder::Discord(<redacted>)",
            Responder::None => "Responder::None",
        })
    }
}

/// Everything the chat handlers share.
pub struct ChatState {
    pub bot: Arc<BotState>,
    pub clock: Arc<dyn Clock>,
    pub executor: Arc<dyn StepExecutor>,
    pub alertmanager: Option<alertmanager::Client>,
    pub http: reqwest::Client,
    pub runbooks_dir: Option<PathBuf>,
    /// The bot's agent inventory: node steps only for alerts whose instance
    /// it knows, and the node's real name for `{{node}}`.
    pub agents: Option<Arc<dyn AgentDirectory>>,
    /// For `/v1/events` on agents (`[agents]` transport).
    agent_events: crate::inventory::EventsClient,
}

impl ChatState {
    /// The production state: steps run through the real executor (bot steps
    /// here, node steps on the alert's agent), AlertManager from the config.
    pub fn new(bot: Arc<BotState>) -> Arc<ChatState> {
        let cfg = &bot.config;
        let (inventory, node) = crate::inventory::node_steps(cfg);
        if let NodeSteps::Unavailable(why) = &node {
            if cfg.agents.is_some() {
                tracing::warn!(reason = %why, "node steps cannot run from chat");
            }
        }
        let executor: Arc<dyn StepExecutor> = Arc::new(
            Executor::new(
                Arc::new(ProcessRunner),
                node,
                cfg.prometheus.as_ref().map(|p| p.url.clone()),
            )
            .with_directory(inventory.clone()),
        );
        let chat = ChatState::with_executor(bot.clone(), Arc::new(SystemClock), executor);
        chat.with_agents(inventory)
    }

    /// Sets the agent inventory (the production state does; tests may).
    pub fn with_agents(self: Arc<Self>, agents: Option<Arc<dyn AgentDirectory>>) -> Arc<ChatState> {
        match Arc::try_unwrap(self) {
            Ok(mut c) => {
                c.agents = agents;
                Arc::new(c)
            }
            Err(shared) => {
                tracing::error!("chat state already shared; agent inventory not set");
                shared
            }
        }
    }

    /// With an explicit clock and executor (tests).
    pub fn with_executor(
        bot: Arc<BotState>,
        clock: Arc<dyn Clock>,
        executor: Arc<dyn StepExecutor>,
    ) -> Arc<ChatState> {
        let alertmanager = bot
            .config
            .alertmanager
            .as_ref()
            .map(|a| alertmanager::Client::new(&a.url));
        let runbooks_dir = bot.config.runbooks.dir.clone();
        let agent_events = crate::inventory::EventsClient::from_config(&bot.config);
        if let Err(e) = approvals::create_table(&bot.store) {
            tracing::error!(error = %e, "cannot create the chat_runs table; runs will fail");
        }
        Arc::new(ChatState {
            bot,
            clock,
            executor,
            alertmanager,
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(3))
                .timeout(RESPOND_TIMEOUT)
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap_or_else(|_| reqwest::Client::new()),
            runbooks_dir,
            agents: None,
            agent_events,
        })
    }

    /// Unix seconds from the state's clock.
    pub fn now(&self) -> i64 {
        self.clock.now_unix()
    }

    /// The role of a user under `[rbac]` (ids with or without the
    /// `slack:`/`discord:` prefix).
    pub fn role_of(&self, user: &User) -> Role {
        crate::rbac::role_of(&self.bot.config.rbac, &[&user.id, &user.key()])
    }

    /// The person behind an account key (`slack:U0123`): their
    /// `[[rbac.people]]` name, or the key itself when not listed.
    pub fn person_of(&self, account: &str) -> String {
        self.bot.config.rbac.person_of(account)
    }

    /// Loads the runbook directory (off the async threads). Invalid files
    /// are logged and left out.
    pub async fn runbooks(&self) -> Arc<RunbookSet> {
        let Some(dir) = self.runbooks_dir.clone() else {
            return Arc::new(RunbookSet::default());
        };
        let loaded = tokio::task::spawn_blocking(move || RunbookSet::load_dir(&dir)).await;
        match loaded {
            Ok((set, errors)) => {
                for e in &errors.0 {
                    tracing::warn!(error = %e, "runbook left out");
                }
                Arc::new(set)
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot load runbooks");
                Arc::new(RunbookSet::default())
            }
        }
    }

    /// Records an audit entry (also logged by the store); failures are logged.
    pub async fn audit(
        &self,
        who: &str,
        action: &str,
        params: serde_json::Value,
        target: Option<String>,
        outcome: &str,
    ) {
        if let Err(e) = self
            .bot
            .store
            .audit(
                who.to_string(),
                action.to_string(),
                params,
                target,
                outcome.to_string(),
            )
            .await
        {
            tracing::error!(error = %e, action, who, "cannot write the audit record");
        }
    }

    /// Refuses a verified request seen before within the window (replays).
    /// The key is the request itself ([`request_key`]), not the signature
    /// header's text, so a re-encoded signature (hex case, spacing) of the
    /// same request is the same request. Keys are kept in the store (across
    /// restarts) for twice the signing window; a store failure refuses,
    /// with `Err` and [`STORAGE_UNAVAILABLE`] for the user.
    pub async fn first_use(
        &self,
        platform: Platform,
        timestamp: &str,
        body: &[u8],
    ) -> Result<bool, &'static str> {
        let key = request_key(platform, timestamp, body);
        match self
            .bot
            .store
            .first_use(key, self.now(), 2 * WINDOW_SECS)
            .await
        {
            Ok(first) => Ok(first),
            Err(e) => {
                tracing::error!(error = %e, "cannot record the request's replay key; refusing it");
                Err(STORAGE_UNAVAILABLE)
            }
        }
    }
}

/// What a chat user is told when the bot cannot reach its store (the
/// request was not acted on; nothing was recorded).
pub const STORAGE_UNAVAILABLE: &str =
    "storage unavailable: gpuops cannot reach its database right now, so nothing was done; try again in a minute";

/// The runbook set the alert renderer suggests from (`[runbooks] dir`,
/// loaded once at start; invalid files are logged and left out).
pub fn load_runbooks_for_messages(cfg: &crate::config::BotConfig) -> Option<Arc<RunbookSet>> {
    let dir = cfg.runbooks.dir.as_ref()?;
    let (set, errors) = RunbookSet::load_dir(dir);
    for e in &errors.0 {
        tracing::warn!(error = %e, "runbook left out");
    }
    Some(Arc::new(set))
}

/// The bot renderer's hook for the Run button: the first runbook whose
/// triggers match a firing alert of the group (`[runbooks] dir`, loaded once).
pub fn runbook_suggester(cfg: &crate::config::BotConfig) -> Option<alert::RunbookSuggester> {
    let set = load_runbooks_for_messages(cfg)?;
    Some(Arc::new(move |hook: &Webhook| {
        let mut alerts: Vec<&alert::Alert> = hook.alerts.iter().collect();
        alerts.sort_by_key(|a| a.status != "firing");
        alerts
            .iter()
            .find_map(|a| set.suggest(&a.labels).first().map(|r| r.id.clone()))
    }))
}

/// The chat routes, to merge into the bot's router
/// (`bot_role::router_with(state, chat::routes(chat))`).
pub fn routes(chat: Arc<ChatState>) -> Router {
    use axum::extract::DefaultBodyLimit;
    Router::new()
        .route("/slack/commands", post(slack::commands))
        .route("/slack/interactions", post(slack::interactions))
        .route("/discord/interactions", post(discord::interactions))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(chat)
}

/// Starts the chat role beside the bot: marks runs cut off by a restart,
/// starts the approval-expiry task, and returns the routes.
pub async fn start(chat: Arc<ChatState>, stop: tokio::sync::watch::Receiver<bool>) -> Router {
    let cfg = &chat.bot.config;
    let runbooks = chat.runbooks().await.runbooks.len();
    tracing::info!(
        slack = cfg
            .slack
            .as_ref()
            .is_some_and(|s| s.signing_secret.is_some()),
        discord = cfg.discord.as_ref().is_some_and(|d| d.public_key.is_some()),
        alertmanager = cfg.alertmanager.is_some(),
        agents = chat.agents.is_some(),
        signing_key = %cfg
            .agents
            .as_ref()
            .and_then(|a| a.signing_key.as_ref())
            .map(|k| k.key_id().to_string())
            .unwrap_or_else(|| "none".into()),
        runbooks,
        admins = cfg.rbac.admins.len(),
        operators = cfg.rbac.operators.len(),
        "chat endpoints at POST /slack/commands, /slack/interactions, /discord/interactions"
    );
    approvals::recover(&chat).await;
    approvals::spawn_expiry(chat.clone(), stop);
    routes(chat)
}

/// Handles one verified command.
pub async fn handle_command(
    chat: &Arc<ChatState>,
    user: &User,
    text: &str,
    responder: Responder,
) -> Outcome {
    let who = user.key();
    let role = chat.role_of(user);
    let cmd = match parse_command(text) {
        Ok(c) => c,
        Err(msg) => {
            chat.audit(
                &who,
                "command",
                serde_json::json!({ "text": notify::truncate_chars(text, 300) }),
                None,
                "refused: unparsable",
            )
            .await;
            return Outcome::Now(Reply::private(msg));
        }
    };
    let action = match &cmd {
        Command::Help => ChatAction::Help,
        Command::Status { .. } => ChatAction::Status,
        Command::Alerts => ChatAction::Alerts,
        Command::Ack { .. } => ChatAction::Ack,
        Command::Silence { .. } => ChatAction::Silence,
        Command::Unsilence { .. } => ChatAction::Unsilence,
        Command::Runbooks { .. } => ChatAction::Runbooks,
        Command::Nodes => ChatAction::Status,
        Command::Node { .. } => ChatAction::NodeState,
        // Checked per step (and per approver) further on.
        Command::Run { .. } | Command::Approve { .. } | Command::Deny { .. } => ChatAction::Help,
    };
    if let Err(denied) = authorize(role, action, None) {
        chat.audit(
            &who,
            cmd.name(),
            command_params(&cmd),
            None,
            &format!("denied: {denied}"),
        )
        .await;
        return Outcome::Now(Reply::private(format!(
            "⛔ {denied} (you are a {}).",
            role.as_str()
        )));
    }
    match cmd {
        Command::Help => {
            chat.audit(&who, "help", serde_json::json!({}), None, "ok")
                .await;
            Outcome::Now(Reply::private(USAGE))
        }
        Command::Status { node } => {
            let text = status_text(chat, node.as_deref()).await;
            chat.audit(
                &who,
                "status",
                serde_json::json!({ "node": node }),
                None,
                "ok",
            )
            .await;
            Outcome::Now(Reply::private(text))
        }
        Command::Alerts => {
            let text = alerts_text(chat).await;
            chat.audit(&who, "alerts", serde_json::json!({}), None, "ok")
                .await;
            Outcome::Now(Reply::private(text))
        }
        Command::Runbooks { alertname } => {
            let set = chat.runbooks().await;
            let text = runbooks_text(&set, alertname.as_deref(), chat.runbooks_dir.is_some());
            chat.audit(
                &who,
                "runbooks",
                serde_json::json!({ "alertname": alertname }),
                None,
                "ok",
            )
            .await;
            Outcome::Now(Reply::private(text))
        }
        Command::Ack { target } => ack(chat, user, &target).await,
        Command::Silence {
            matchers,
            duration,
            comment,
        } => {
            let comment =
                comment.unwrap_or_else(|| format!("silenced from chat by {}", user.display()));
            silence(chat, user, matchers, duration, comment, responder, None).await
        }
        Command::Unsilence { id } => unsilence(chat, user, id, responder).await,
        Command::Run {
            runbook,
            steps,
            alert,
            params,
        } => {
            approvals::start_run(
                chat,
                user,
                approvals::RunRequest {
                    runbook,
                    steps,
                    group: alert,
                    params,
                },
                responder,
            )
            .await
        }
        Command::Approve { run } => approvals::approve(chat, user, &run, responder).await,
        Command::Deny { run } => approvals::deny(chat, user, &run, responder).await,
        Command::Nodes => nodes_command(chat, user).await,
        Command::Node {
            node,
            state,
            reason,
        } => node_command(chat, user, &node, state, reason).await,
    }
}

/// Handles one verified button press.
pub async fn handle_button(
    chat: &Arc<ChatState>,
    user: &User,
    action: ButtonAction,
    responder: Responder,
) -> Outcome {
    let who = user.key();
    let role = chat.role_of(user);
    let (chat_action, name, group) = match &action {
        ButtonAction::Ack { group } => (ChatAction::Ack, "button_ack", *group),
        ButtonAction::Silence1h { group } => (ChatAction::Silence, "button_silence", *group),
        ButtonAction::Run { group, .. } => (ChatAction::Help, "button_run", *group),
        // Checked as the typed commands are, in approvals.rs.
        ButtonAction::Approve { .. } => (ChatAction::Help, "button_approve", 0),
        ButtonAction::Deny { .. } => (ChatAction::Help, "button_deny", 0),
    };
    if let Err(denied) = authorize(role, chat_action, None) {
        chat.audit(
            &who,
            name,
            serde_json::json!({ "group": group }),
            Some(format!("group:{group}")),
            &format!("denied: {denied}"),
        )
        .await;
        return Outcome::Now(Reply::private(format!(
            "⛔ {denied} (you are a {}).",
            role.as_str()
        )));
    }
    match action {
        ButtonAction::Ack { group } => ack(chat, user, &group.to_string()).await,
        ButtonAction::Silence1h { group } => {
            let g = match chat.bot.store.group(group).await {
                Ok(Some(g)) => g,
                Ok(None) => return Outcome::Now(Reply::private(format!("no alert group {group}"))),
                Err(e) => return Outcome::Now(Reply::private(format!("store error: {e}"))),
            };
            let labels = match serde_json::from_str::<Webhook>(&g.state) {
                Ok(h) => h.shared_labels(),
                Err(_) => BTreeMap::new(),
            };
            if labels.is_empty() {
                return Outcome::Now(Reply::private(
                    "this group has no common labels to silence on; use `/gpuops silence`",
                ));
            }
            silence(
                chat,
                user,
                alertmanager::matchers_for_labels(&labels),
                Duration::from_secs(3600),
                format!(
                    "silenced for 1h from the alert message by {}",
                    user.display()
                ),
                responder,
                Some(group),
            )
            .await
        }
        ButtonAction::Run { group, runbook } => {
            approvals::start_run(
                chat,
                user,
                approvals::RunRequest {
                    runbook,
                    steps: None,
                    group: Some(group),
                    params: BTreeMap::new(),
                },
                responder,
            )
            .await
        }
        ButtonAction::Approve { run } => {
            approvals::approve_button(chat, user, &run, responder).await
        }
        ButtonAction::Deny { run } => approvals::deny_button(chat, user, &run, responder).await,
    }
}

/// Sends a later answer through the responder (errors are logged, redacted).
pub async fn respond(chat: &ChatState, responder: &Responder, reply: &Reply) {
    let result = match responder {
        Responder::None => return,
        Responder::Slack { response_url } => {
            let body = notify::slack::response_url_body(
                &slack_escape(&notify::truncate_chars(
                    &reply.text,
                    Platform::Slack.text_limit(),
                )),
                reply.visibility == Visibility::InChannel,
            );
            chat.http.post(response_url).json(&body).send().await
        }
        Responder::Discord {
            api_url,
            application_id,
            token,
            original_pending,
        } => {
            let content = notify::truncate_chars(&reply.text, Platform::Discord.text_limit());
            let base = notify::discord::followup_url(api_url, application_id, token);
            if original_pending.swap(false, std::sync::atomic::Ordering::SeqCst) {
                chat.http
                    .patch(format!("{base}/messages/@original"))
                    .json(&notify::discord::followup_body(&content, false))
                    .send()
                    .await
            } else {
                let body = notify::discord::followup_body(
                    &content,
                    reply.visibility == Visibility::Ephemeral,
                );
                chat.http.post(base).json(&body).send().await
            }
        }
    };
    match result {
        Ok(r) if r.status().is_success() => {}
        Ok(r) => tracing::warn!(status = r.status().as_u16(), "chat follow-up refused"),
        Err(e) => {
            let mut msg = e.to_string();
            if let Some(u) = e.url() {
                msg = msg.replace(u.as_str(), "<url>");
            }
            tracing::warn!(error = %crate::telemetry::redact(&msg), "chat follow-up failed");
        }
    }
}

/// A step's result as chat text: a status line and the output in a code block.
pub fn step_message(
    plan: &RunPlan,
    step: &PlannedStep,
    out: &StepOutcome,
    run: &str,
) -> (String, String) {
    use crate::runbook::engine::StepStatus::*;
    let icon = match out.status {
        Succeeded => "✅",
        Failed => "❌",
        TimedOut => "⏱",
        Skipped => "⏭",
        Error => "⚠️",
        Unavailable => "➖",
        Denied => "🚫",
        Expired => "⌛",
    };
    let mut head = format!(
        "{icon} {} `{}` — {}",
        step.header(plan.steps.len()),
        plan.runbook.id,
        serde_json::to_value(out.status)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    );
    if let Some(code) = out.exit_code {
        let _ = write!(head, " (exit {code})");
    }
    if out.duration > Duration::ZERO {
        let _ = write!(head, " in {:.1}s", out.duration.as_secs_f64());
    }
    let mut body = out.output.trim_end().to_string();
    if body.chars().count() > OUTPUT_CHARS {
        let total = body.chars().count();
        body = body.chars().take(OUTPUT_CHARS).collect();
        let _ = write!(
            body,
            "\n… {} more characters (`gpuops audit --run {run}` prints the output in full)",
            total - OUTPUT_CHARS
        );
    }
    if body.is_empty() {
        body = "(no output)".into();
    }
    (head, body.replace("```", "`\u{200b}``"))
}

fn command_params(cmd: &Command) -> serde_json::Value {
    match cmd {
        Command::Help | Command::Alerts => serde_json::json!({}),
        Command::Status { node } => serde_json::json!({ "node": node }),
        Command::Ack { target } => serde_json::json!({ "target": target }),
        Command::Silence {
            matchers,
            duration,
            comment,
        } => serde_json::json!({
            "matchers": alertmanager::format_matchers(matchers),
            "duration": humantime::format_duration(*duration).to_string(),
            "comment": comment,
        }),
        Command::Unsilence { id } => serde_json::json!({ "id": id }),
        Command::Runbooks { alertname } => serde_json::json!({ "alertname": alertname }),
        Command::Run {
            runbook,
            steps,
            alert,
            params,
        } => {
            serde_json::json!({ "runbook": runbook, "steps": steps, "alert": alert, "params": params })
        }
        Command::Approve { run } | Command::Deny { run } => serde_json::json!({ "run": run }),
        Command::Nodes => serde_json::json!({}),
        Command::Node {
            node,
            state,
            reason,
        } => serde_json::json!({ "node": node, "state": state.as_str(), "reason": reason }),
    }
}

/// The replay-cache key of a verified request: SHA-256 over the platform,
/// the signed timestamp (trimmed, as the signature covers it) and the raw
/// body. Both platforms sign exactly `timestamp + body`, so two requests
/// with the same key are the same request, however the signature was spelt.
pub fn request_key(platform: Platform, timestamp: &str, body: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    h.update(platform.as_str().as_bytes());
    h.update([0]);
    h.update(timestamp.trim().as_bytes());
    h.update([0]);
    h.update(body);
    h.finalize().into()
}

/// Escapes what Slack's text format treats as markup (`<!channel>`,
/// `<@U…>`, links): answers never ping or link on a user's behalf
/// ([`crate::escape::slack`]).
pub fn slack_escape(s: &str) -> String {
    crate::escape::slack(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expect: expect_test::Expect) {
        let got = match parse_command(input) {
            Ok(c) => format!("{c:?}"),
            Err(e) => format!("error: {}", e.lines().next().unwrap_or("")),
        };
        expect.assert_eq(&got);
    }

    #[test]
    fn commands_parse() {
        use expect_test::expect;
        check("", expect!["Help"]);
        check(
            "status node1",
            expect![[r#"Status { node: Some("node1") }"#]],
        );
        check("status a b", expect!["error: usage: `status [node]`"]);
        check("ack 12", expect![[r#"Ack { target: "12" }"#]]);
        check(
            "silence GpuDown 2h maintenance window",
            expect![[
                r#"Silence { matchers: [Matcher { name: "alertname", value: "GpuDown", is_regex: false, is_equal: true }], duration: 7200s, comment: Some("maintenance window") }"#
            ]],
        );
        check(
            r#"silence alertname=GpuDown, instance=~"node1.*" 30m"#,
            expect![[
                r#"Silence { matchers: [Matcher { name: "alertname", value: "GpuDown", is_regex: false, is_equal: true }, Matcher { name: "instance", value: "node1.*", is_regex: true, is_equal: true }], duration: 1800s, comment: None }"#
            ]],
        );
        check(
            "silence GpuDown",
            expect!["error: usage: `silence <alertname|matchers> <duration> [comment]`"],
        );
        check(
            "silence GpuDown 5s",
            expect!["error: silence: a silence lasts between 1m and 90d, got 5s"],
        );
        check(
            "silence &lt;x 1h",
            expect![[r#"error: silence: expected a label name at position 1 of "<x""#]],
        );
        check(
            "unsilence ../etc",
            expect![[r#"error: unsilence: "../etc" is not a silence id"#]],
        );
        check(
            "run gpu-xid:kernel-log,gpu-reset alert=#7 gpu=0",
            expect![[
                r#"Run { runbook: "gpu-xid", steps: Some(["kernel-log", "gpu-reset"]), alert: Some(7), params: {"gpu": "0"} }"#
            ]],
        );
        check(
            "run ../x",
            expect![[r#"error: run: "../x" is not a runbook id"#]],
        );
        check(
            "run gpu-xid --help",
            expect![[r#"error: run: "--help" is not a parameter (write name=value)"#]],
        );
        check(
            "run gpu-xid gpu=0 gpu=1",
            expect!["error: run: parameter gpu given twice"],
        );
        check(
            "run gpu-xid GPU=0",
            expect![[r#"error: run: "GPU" is not a parameter name"#]],
        );
        check(
            "approve r1a2b3c",
            expect![[r#"Approve { run: "r1a2b3c" }"#]],
        );
        check(
            "approve; rm",
            expect![[r#"error: unknown command "approve;""#]],
        );
        check("reboot", expect![[r#"error: unknown command "reboot""#]]);
        check(
            "run x a=\u{0}",
            expect!["error: the command contains a control character"],
        );
    }

    #[test]
    fn quoted_values_stay_one_token() {
        assert_eq!(
            tokenize(r#"run x node="a b" c=d"#).unwrap(),
            ["run", "x", "node=\"a b\"", "c=d"]
        );
        assert!(tokenize(r#"a "b"#).is_err());
    }

    #[test]
    fn replay_keys_name_the_request_not_its_spelling() {
        let k = |ts: &str, body: &str| request_key(Platform::Slack, ts, body.as_bytes());
        assert_eq!(k("100", "a=1"), k(" 100 ", "a=1"), "spacing");
        assert_ne!(k("100", "a=1"), k("100", "a=2"));
        assert_ne!(k("100", "a=1"), k("101", "a=1"));
        assert_ne!(
            k("10", "0a=1"),
            k("100", "a=1"),
            "timestamp and body are separated"
        );
        assert_ne!(
            k("100", "a=1"),
            request_key(Platform::Discord, "100", b"a=1")
        );
    }
}
