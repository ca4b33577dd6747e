//! The bot's configuration (`/etc/gpuops/bot.toml`), every option with its
//! default. `config/bot.example.toml` documents the same options; a test
//! parses it so the two cannot drift. All sections of the bot (webhooks,
//! chat, runbooks, agents, roles, approvals) are read and validated here, at
//! once; code past this module only sees validated values. No network I/O.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::agent::LogConfig;
pub use crate::config::lifecycle::LifecycleConfig;
use crate::config::paging::{self, DigestConfig, EmailConfig, PagerDutyConfig};
use crate::config::reports::{self, ReportConfig};
use crate::config::routing::{default_severity_map, Destination, Routing, Tier};
pub use crate::config::store::{StoreConfig, StoreSync};
use crate::config::{
    anchored_regex, positive_secs, read_file, read_log_section, read_secret, read_web_limits,
    ConfigErrors, Reader, Secret, WebLimits,
};

/// Default bot port (next to the agent's 9949).
pub const DEFAULT_BOT_PORT: u16 = 9950;
/// Default cap on a webhook body: 100 alerts with large annotations fit easily.
pub const DEFAULT_MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
pub const DEFAULT_SLACK_API_URL: &str = "https://slack.com/api";
pub const DEFAULT_DISCORD_API_URL: &str = "https://discord.com";

#[derive(Debug, Clone)]
pub struct BotConfig {
    /// Where this configuration came from; `None` means no file at all
    /// (console destination, test alert on start).
    pub source: Option<PathBuf>,
    pub server: ServerConfig,
    pub store: StoreConfig,
    pub log: LogConfig,
    pub slack: Option<SlackConfig>,
    pub discord: Option<DiscordConfig>,
    pub routing: Routing,
    pub delivery: DeliveryConfig,
    pub alertmanager: Option<AlertmanagerConfig>,
    pub prometheus: Option<PrometheusConfig>,
    pub runbooks: RunbooksConfig,
    pub agents: Option<AgentsConfig>,
    pub rbac: RbacConfig,
    pub approvals: ApprovalsConfig,
    /// `[pagerduty]` (defaults apply when only destinations name keys).
    pub pagerduty: PagerDutyConfig,
    pub email: Option<EmailConfig>,
    pub digest: Option<DigestConfig>,
    /// `[[reports]]`: scheduled health reports.
    pub reports: Vec<ReportConfig>,
    /// `[lifecycle]`: nodes out of service.
    pub lifecycle: LifecycleConfig,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Bearer token AlertManager must send (`http_config.authorization`).
    pub webhook_token: Option<Secret>,
    /// Serve `POST /alertmanager` without a token on a non-loopback address
    /// (refused by default: anyone who reaches it could post alerts).
    pub allow_unauthenticated_webhooks: bool,
    pub max_body_bytes: usize,
    /// Connection cap and timeouts of the HTTP server.
    pub limits: WebLimits,
}

impl ServerConfig {
    /// Why the bot must not serve with these settings: a listener other
    /// than loopback with no `webhook_token`, unless
    /// `allow_unauthenticated_webhooks` says so. `None` when it may.
    pub fn unauthenticated_public_listener(&self) -> Option<String> {
        if self.listen.ip().is_loopback()
            || self.webhook_token.is_some()
            || self.allow_unauthenticated_webhooks
        {
            return None;
        }
        Some(format!(
            "{} is not a loopback address and server.webhook_token is not set, so anyone who reaches it could post alerts; set webhook_token (or webhook_token_file), listen on 127.0.0.1, or set server.allow_unauthenticated_webhooks = true",
            self.listen
        ))
    }
}

#[derive(Debug, Clone)]
pub struct SlackConfig {
    pub bot_token: Secret,
    /// Verifies slash commands and interactions (issue 5).
    pub signing_secret: Option<Secret>,
    /// Web API base, e.g. `https://slack.com/api` (http allowed, for tests).
    pub api_url: String,
}

#[derive(Debug, Clone)]
pub struct DiscordConfig {
    pub bot_token: Secret,
    pub application_id: Option<u64>,
    /// Ed25519 public key of the application (interactions, issue 5).
    pub public_key: Option<[u8; 32]>,
    /// API base; requests go to `<api_url>/api/v10/...`.
    pub api_url: String,
}

#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    /// Deadline of one platform call.
    pub timeout: Duration,
    /// First retry delay after a 5xx or network error; doubles per attempt.
    pub backoff_initial: Duration,
    /// Cap on the retry delay.
    pub backoff_max: Duration,
    /// After this long in the outbox a delivery is dead-lettered.
    pub give_up_after: Duration,
    /// Deliveries in flight at once (across destinations).
    pub concurrency: usize,
}

#[derive(Debug, Clone)]
pub struct AlertmanagerConfig {
    /// Base URL, e.g. `http://127.0.0.1:9093` (silences, links).
    pub url: String,
}

#[derive(Debug, Clone)]
pub struct PrometheusConfig {
    /// Base URL, e.g. `http://127.0.0.1:9090` (PromQL runbook steps, links).
    pub url: String,
}

#[derive(Debug, Clone, Default)]
pub struct RunbooksConfig {
    pub dir: Option<PathBuf>,
}

/// The agents the bot may send node steps to, and the key it signs with.
#[derive(Debug, Clone)]
pub struct AgentsConfig {
    /// The bot's Ed25519 private key (`signing_key_file`); `None` leaves
    /// node steps unavailable.
    pub signing_key: Option<std::sync::Arc<crate::exec_auth::ExecSigner>>,
    /// Agents listed in the config (`[[agents.nodes]]`).
    pub nodes: Vec<StaticAgent>,
    /// Discover agents from this Prometheus job's targets (`[prometheus] url`).
    pub prometheus_job: Option<String>,
    /// The target label holding a discovered agent's node name.
    pub node_label: String,
    /// How often discovered targets are re-read.
    pub refresh: Duration,
    /// How the bot connects to agents that serve TLS or ask for credentials
    /// (an agent's `--web.config.file`).
    pub transport: AgentTransport,
}

/// TLS trust, client certificate and basic auth for the bot's requests to
/// agents (`/v1/exec`, `/v1/events`).
#[derive(Debug, Clone, Default)]
pub struct AgentTransport {
    /// PEM CA certificate(s) that sign the agents' server certificates
    /// (`ca_file`); the system roots otherwise.
    pub ca_pem: Option<Vec<u8>>,
    /// PEM client certificate and key, concatenated (`client_cert_file`,
    /// `client_key_file`), for agents that require client certificates.
    pub identity_pem: Option<Secret>,
    /// `basic_auth_username` and `basic_auth_password(_file)`.
    pub basic_auth: Option<(String, Secret)>,
}

/// One `[[agents.nodes]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticAgent {
    /// The `instance` label alerts carry for this agent (`host:port`).
    pub instance: String,
    /// The node's real name (what `{{node}}` becomes; what the agent's `node_name` is).
    pub node: String,
    /// The agent's base URL; default `http://{instance}`.
    pub url: String,
}

#[derive(Debug, Clone, Default)]
pub struct RbacConfig {
    pub admins: Vec<String>,
    pub operators: Vec<String>,
    /// `[[rbac.people]]`: account key (`slack:U0123`, `discord:1234`) → the
    /// person's name. An account belongs to at most one person; an account
    /// not listed is a person of its own. The two-person rule compares people.
    pub people: BTreeMap<String, String>,
    /// `max_silence`: the longest silence an operator may create alone
    /// (`None`: `rbac::DEFAULT_MAX_SILENCE`, 24 h); a longer one,
    /// or one matching every alert, needs an admin.
    pub max_silence: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct ApprovalsConfig {
    pub expiry: Duration,
}

/// `$STATE_DIRECTORY/gpuops.db` under systemd (the package's name), else
/// `./gpuops-bot.db`.
pub fn default_store_path() -> PathBuf {
    match std::env::var_os("STATE_DIRECTORY") {
        Some(dirs) if !dirs.is_empty() => {
            let s = dirs.to_string_lossy().to_string();
            let first = s.split(':').next().unwrap_or("").to_string();
            PathBuf::from(first).join("gpuops.db")
        }
        _ => PathBuf::from("gpuops-bot.db"),
    }
}

impl Default for BotConfig {
    fn default() -> Self {
        BotConfig {
            source: None,
            server: ServerConfig {
                listen: SocketAddr::from(([127, 0, 0, 1], DEFAULT_BOT_PORT)),
                webhook_token: None,
                allow_unauthenticated_webhooks: false,
                max_body_bytes: DEFAULT_MAX_BODY_BYTES,
                limits: WebLimits::default(),
            },
            store: StoreConfig {
                path: default_store_path(),
                webhook_retention: Duration::from_secs(7 * 86_400),
                sync: StoreSync::Full,
                url: None,
                password: None,
                ca_file: None,
                migrate_on_start: true,
                pool_size: 16,
                connect_timeout: Duration::from_secs(5),
            },
            log: LogConfig::default(),
            slack: None,
            discord: None,
            routing: Routing::default(),
            delivery: DeliveryConfig {
                timeout: Duration::from_secs(10),
                backoff_initial: Duration::from_secs(1),
                backoff_max: Duration::from_secs(300),
                give_up_after: Duration::from_secs(86_400),
                concurrency: 8,
            },
            alertmanager: None,
            prometheus: None,
            runbooks: RunbooksConfig::default(),
            agents: None,
            rbac: RbacConfig::default(),
            approvals: ApprovalsConfig {
                expiry: Duration::from_secs(900),
            },
            pagerduty: PagerDutyConfig::default(),
            email: None,
            digest: None,
            reports: Vec::new(),
            lifecycle: LifecycleConfig::default(),
        }
    }
}

impl BotConfig {
    /// What a valid configuration still gets wrong for a first install
    /// (logged at the bot's start, printed by `check-config`): chat without
    /// anybody holding a role, runbooks without any agent to run node steps
    /// on. Whether `[agents] prometheus_job` has targets needs Prometheus:
    /// `inventory::job_warning`.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        let chat: Vec<&str> = [
            self.slack.as_ref().map(|_| "[slack]"),
            self.discord.as_ref().map(|_| "[discord]"),
        ]
        .into_iter()
        .flatten()
        .collect();
        if !chat.is_empty() && self.rbac.admins.is_empty() && self.rbac.operators.is_empty() {
            out.push(format!(
                "chat is configured ({}) but nobody has a role: [rbac] admins and operators are empty, so nobody can ack, silence, approve or run a runbook",
                chat.join(", ")
            ));
        }
        let inventory_empty = match &self.agents {
            None => true,
            Some(a) => a.nodes.is_empty() && a.prometheus_job.is_none(),
        };
        if self.runbooks.dir.is_some() && inventory_empty {
            out.push(
                "the agent inventory is empty ([agents] has no [[agents.nodes]] and no prometheus_job): every runbook step on a node will be refused"
                    .to_string(),
            );
        }
        out
    }

    /// Reads and validates `path`, reporting every error in it at once.
    pub fn from_file(path: &Path) -> Result<BotConfig, ConfigErrors> {
        let text = read_file(path)?;
        BotConfig::from_text(path, &text, true)
    }

    /// Validates `text`, which came from `path` (used in error messages).
    pub fn from_str(path: &Path, text: &str) -> Result<BotConfig, ConfigErrors> {
        BotConfig::from_text(path, text, false)
    }

    /// `on_disk`: `text` is `path`'s, whose mode decides whether inline
    /// secrets are allowed in it.
    fn from_text(path: &Path, text: &str, on_disk: bool) -> Result<BotConfig, ConfigErrors> {
        let (mut r, mut root) = Reader::parse(path, text)?;
        r.set_on_disk(on_disk);
        let mut c = BotConfig {
            source: Some(path.to_path_buf()),
            ..BotConfig::default()
        };

        if let Some(mut s) = r.table(&mut root, "server") {
            if let Some(v) = r.get_with(&mut s, "listen", |s: String| {
                s.parse::<SocketAddr>()
                    .map_err(|e| format!("{s:?} is not an address:port ({e})"))
            }) {
                c.server.listen = v;
            }
            c.server.webhook_token =
                read_secret(&mut r, &mut s, "webhook_token", "webhook_token_file");
            if let Some(v) = r.get_with(&mut s, "max_body_bytes", |n: i64| {
                if (1024..=256 * 1024 * 1024).contains(&n) {
                    Ok(n as usize)
                } else {
                    Err(format!("must be between 1024 and 268435456, got {n}"))
                }
            }) {
                c.server.max_body_bytes = v;
            }
            c.server.allow_unauthenticated_webhooks = r
                .get(&mut s, "allow_unauthenticated_webhooks")
                .unwrap_or(false);
            if let Some(why) = c.server.unauthenticated_public_listener() {
                r.error(&s, "listen", why);
            }
            read_web_limits(&mut r, &mut s, &mut c.server.limits);
            r.finish(s);
        }

        if let Some(mut s) = r.table(&mut root, "store") {
            crate::config::store::read_section(&mut r, &mut s, &mut c.store);
            r.finish(s);
        }

        if let Some(s) = r.table(&mut root, "log") {
            c.log = read_log_section(&mut r, s);
        }

        if let Some(mut s) = r.table(&mut root, "slack") {
            let token = read_secret(&mut r, &mut s, "bot_token", "bot_token_file");
            let signing_secret =
                read_secret(&mut r, &mut s, "signing_secret", "signing_secret_file");
            let api_url = r
                .get_with(&mut s, "api_url", http_url)
                .unwrap_or_else(|| DEFAULT_SLACK_API_URL.to_string());
            match token {
                Some(bot_token) => {
                    c.slack = Some(SlackConfig {
                        bot_token,
                        signing_secret,
                        api_url,
                    })
                }
                None => r.error(&s, "", "needs bot_token or bot_token_file"),
            }
            r.finish(s);
        }

        if let Some(mut s) = r.table(&mut root, "discord") {
            let token = read_secret(&mut r, &mut s, "bot_token", "bot_token_file");
            let application_id = r.get_with(&mut s, "application_id", snowflake);
            let public_key = r.get_with(&mut s, "public_key", |h: String| {
                let bytes =
                    hex::decode(h.trim()).map_err(|e| format!("must be 64 hex digits: {e}"))?;
                <[u8; 32]>::try_from(bytes.as_slice())
                    .map_err(|_| format!("must be 32 bytes (64 hex digits), got {}", bytes.len()))
            });
            let api_url = r
                .get_with(&mut s, "api_url", http_url)
                .unwrap_or_else(|| DEFAULT_DISCORD_API_URL.to_string());
            match token {
                Some(bot_token) => {
                    c.discord = Some(DiscordConfig {
                        bot_token,
                        application_id,
                        public_key,
                        api_url,
                    })
                }
                None => r.error(&s, "", "needs bot_token or bot_token_file"),
            }
            r.finish(s);
        }

        let mut destinations_given = false;
        if let Some(mut s) = r.table(&mut root, "pagerduty") {
            c.pagerduty = paging::read_pagerduty(&mut r, &mut s);
            r.finish(s);
        }
        if let Some(mut s) = r.table(&mut root, "email") {
            c.email = paging::read_email(&mut r, &mut s);
            r.finish(s);
        }
        if let Some(mut s) = r.table(&mut root, "digest") {
            c.digest = paging::read_digest(&mut r, &mut s);
            r.finish(s);
        }
        let available = paging::Available {
            slack: c.slack.is_some(),
            email: c.email.is_some(),
            digest: c.digest.is_some(),
        };
        let mut pagerduty_keys = BTreeMap::new();

        if let Some(mut s) = r.table(&mut root, "routing") {
            if let Some(v) = r.get_with(&mut s, "default_tier", tier) {
                c.routing.default_tier = v;
            }
            if let Some(map) = r.get_with(&mut s, "severity", |m: BTreeMap<String, String>| {
                let mut out = default_severity_map();
                for (k, v) in m {
                    let t = tier(v.clone()).map_err(|e| format!("{k}: {e}"))?;
                    out.insert(k.trim().to_ascii_lowercase(), t);
                }
                Ok(out)
            }) {
                c.routing.severity = map;
            }
            if let Some(v) = r.get_with(&mut s, "renotify_tiers", |v: Vec<String>| {
                v.into_iter().map(tier).collect::<Result<Vec<_>, _>>()
            }) {
                c.routing.renotify_tiers = v;
            }
            if let Some(v) = r.get_with(&mut s, "correlation_window", |v: String| {
                // "0" (or "0s") turns correlation off.
                if v.trim().trim_end_matches('s') == "0" {
                    Ok(std::time::Duration::ZERO)
                } else {
                    paging::duration(&v)
                }
            }) {
                c.routing.correlation_window = v;
            }
            let dests = r.tables(&mut s, "destinations");
            destinations_given = !dests.is_empty();
            let mut parsed = Vec::new();
            for mut d in dests {
                let tiers = r
                    .get_with(&mut d, "tiers", |v: Vec<String>| {
                        if v.is_empty() {
                            return Err("must list at least one tier".to_string());
                        }
                        v.into_iter().map(tier).collect::<Result<Vec<_>, _>>()
                    })
                    .unwrap_or_else(|| Tier::ALL.to_vec());
                let matchers = r
                    .get_with(&mut d, "matchers", |m: BTreeMap<String, String>| {
                        m.into_iter()
                            .map(|(k, v)| {
                                anchored_regex(v)
                                    .map(|re| (k.clone(), re))
                                    .map_err(|e| format!("{k}: {e}"))
                            })
                            .collect::<Result<Vec<_>, _>>()
                    })
                    .unwrap_or_default();
                let slack_channel: Option<String> =
                    r.get_with(&mut d, "slack_channel", |v: String| {
                        let v = v.trim().to_string();
                        if v.is_empty() || v.contains(char::is_whitespace) {
                            Err(format!("{v:?} is not a channel id"))
                        } else {
                            Ok(v)
                        }
                    });
                let discord_channel = r.get_with(&mut d, "discord_channel", snowflake);
                let webhook_url = r
                    .get_with(&mut d, "webhook_url", |u: String| {
                        http_url(u).map_err(|_| "must be an http(s) URL".to_string())
                    })
                    .map(Secret::new);
                let console = r.get::<bool>(&mut d, "console").unwrap_or(false);
                let pg = paging::read_destination(&mut r, &mut d, available, &mut pagerduty_keys);
                if slack_channel.is_some() && c.slack.is_none() {
                    r.error(
                        &d,
                        "slack_channel",
                        "needs a [slack] section with bot_token",
                    );
                }
                if discord_channel.is_some() && c.discord.is_none() {
                    r.error(
                        &d,
                        "discord_channel",
                        "needs a [discord] section with bot_token",
                    );
                }
                let dest = Destination {
                    tiers,
                    matchers,
                    slack_channel,
                    discord_channel,
                    webhook_url,
                    console,
                    pagerduty_routing_key: pg.pagerduty_routing_key,
                    email: pg.email,
                    digest: pg.digest,
                    escalation: pg.escalation,
                };
                if dest.targets().is_empty() {
                    r.error(
                        &d,
                        "",
                        "names no target: set slack_channel, discord_channel, webhook_url, pagerduty_routing_key, email or console = true",
                    );
                }
                parsed.push(dest);
                r.finish(d);
            }
            if destinations_given {
                c.routing.destinations = parsed;
            }
            r.finish(s);
        }
        if !destinations_given {
            // Without destinations every tier goes to the console, so a new
            // configuration still shows alerts somewhere.
            c.routing.destinations = Routing::default().destinations;
        }
        c.routing.pagerduty_keys = pagerduty_keys;

        if let Some(mut s) = r.table(&mut root, "delivery") {
            let d = &mut c.delivery;
            if let Some(v) = r.get_with(&mut s, "timeout_secs", positive_secs) {
                d.timeout = v;
            }
            if let Some(v) = r.get_with(&mut s, "backoff_initial_secs", positive_secs) {
                d.backoff_initial = v;
            }
            if let Some(v) = r.get_with(&mut s, "backoff_max_secs", positive_secs) {
                d.backoff_max = v;
            }
            if let Some(v) = r.get_with(&mut s, "give_up_after_secs", positive_secs) {
                d.give_up_after = v;
            }
            if let Some(v) = r.get_with(&mut s, "concurrency", |n: i64| {
                if (1..=256).contains(&n) {
                    Ok(n as usize)
                } else {
                    Err(format!("must be between 1 and 256, got {n}"))
                }
            }) {
                d.concurrency = v;
            }
            if d.backoff_max < d.backoff_initial {
                r.error(
                    &s,
                    "backoff_max_secs",
                    "must not be below backoff_initial_secs",
                );
            }
            r.finish(s);
        }

        if let Some(mut s) = r.table(&mut root, "alertmanager") {
            match r.get_with(&mut s, "url", http_url) {
                Some(url) => c.alertmanager = Some(AlertmanagerConfig { url }),
                None if s.keys().iter().all(|k| k != "url") => r.error(&s, "", "needs url"),
                None => {}
            }
            r.finish(s);
        }

        if let Some(mut s) = r.table(&mut root, "prometheus") {
            match r.get_with(&mut s, "url", http_url) {
                Some(url) => c.prometheus = Some(PrometheusConfig { url }),
                None if s.keys().iter().all(|k| k != "url") => r.error(&s, "", "needs url"),
                None => {}
            }
            r.finish(s);
        }

        if let Some(mut s) = r.table(&mut root, "runbooks") {
            c.runbooks.dir = r.get_with(&mut s, "dir", |p: PathBuf| {
                if p.as_os_str().is_empty() {
                    Err("must not be empty".to_string())
                } else if on_disk && !p.is_dir() {
                    // A configuration on disk is the one the bot runs with.
                    Err(format!(
                        "{} is not a directory: no runbook could be offered or run (the package installs them in /usr/share/gpuops/runbooks)",
                        p.display()
                    ))
                } else {
                    Ok(p)
                }
            });
            r.finish(s);
        }

        if let Some(mut s) = r.table(&mut root, "agents") {
            for old in ["url_template", "secret", "secret_file"] {
                if s.keys().iter().any(|k| k == old) {
                    let _: Option<toml::Value> = r.get(&mut s, old);
                    r.error(
                        &s,
                        old,
                        "replaced: agents are now listed ([[agents.nodes]] or prometheus_job) and requests are signed with an Ed25519 key (signing_key_file; `gpuops keygen`); see docs/ops.md \"Security model\"",
                    );
                }
            }
            let mut a = AgentsConfig {
                signing_key: None,
                nodes: Vec::new(),
                prometheus_job: None,
                node_label: "node".into(),
                refresh: Duration::from_secs(60),
                transport: AgentTransport::default(),
            };
            if let Some(path) = r.get::<PathBuf>(&mut s, "ca_file") {
                match std::fs::read(&path) {
                    Ok(pem)
                        if reqwest::Certificate::from_pem_bundle(&pem)
                            .is_ok_and(|c| !c.is_empty()) =>
                    {
                        a.transport.ca_pem = Some(pem)
                    }
                    Ok(_) => r.error(
                        &s,
                        "ca_file",
                        format!("{} holds no PEM certificate", path.display()),
                    ),
                    Err(e) => r.error(
                        &s,
                        "ca_file",
                        format!("cannot read {}: {e}", path.display()),
                    ),
                }
            }
            let cert: Option<PathBuf> = r.get(&mut s, "client_cert_file");
            let key: Option<PathBuf> = r.get(&mut s, "client_key_file");
            match (cert, key) {
                (Some(cert), Some(key)) => {
                    let c = std::fs::read_to_string(&cert);
                    let k = crate::config::load_secret_file(&key);
                    match (c, k) {
                        (Ok(c), Ok(k)) => {
                            let pem = format!("{}\n{}\n", k.expose(), c);
                            if reqwest::Identity::from_pem(pem.as_bytes()).is_ok() {
                                a.transport.identity_pem = Some(Secret::new(pem));
                            } else {
                                r.error(
                                    &s,
                                    "client_cert_file",
                                    "not a PEM certificate and key pair",
                                );
                            }
                        }
                        (Err(e), _) => r.error(
                            &s,
                            "client_cert_file",
                            format!("cannot read {}: {e}", cert.display()),
                        ),
                        (_, Err(e)) => r.error(&s, "client_key_file", e),
                    }
                }
                (None, None) => {}
                (Some(_), None) => r.error(&s, "client_cert_file", "needs client_key_file too"),
                (None, Some(_)) => r.error(&s, "client_key_file", "needs client_cert_file too"),
            }
            let user: Option<String> = r.get(&mut s, "basic_auth_username");
            let password = read_secret(
                &mut r,
                &mut s,
                "basic_auth_password",
                "basic_auth_password_file",
            );
            match (user, password) {
                (Some(u), Some(p)) => a.transport.basic_auth = Some((u, p)),
                (None, None) => {}
                (Some(_), None) => r.error(
                    &s,
                    "basic_auth_username",
                    "needs basic_auth_password or basic_auth_password_file",
                ),
                (None, Some(_)) => r.error(&s, "basic_auth_password", "needs basic_auth_username"),
            }
            if let Some(path) = r.get::<PathBuf>(&mut s, "signing_key_file") {
                match crate::exec_auth::ExecSigner::from_file(&path) {
                    Ok(k) => a.signing_key = Some(std::sync::Arc::new(k)),
                    Err(e) => r.error(&s, "signing_key_file", e),
                }
            }
            a.prometheus_job = r.get_with(&mut s, "prometheus_job", |j: String| {
                if j.trim().is_empty() {
                    Err("must not be empty".to_string())
                } else {
                    Ok(j)
                }
            });
            if let Some(v) = r.get_with(&mut s, "node_label", |l: String| {
                if !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                    Ok(l)
                } else {
                    Err(format!("{l:?} is not a Prometheus label name"))
                }
            }) {
                a.node_label = v;
            }
            if let Some(v) = r.get_with(&mut s, "refresh_secs", positive_secs) {
                a.refresh = v;
            }
            for mut n in r.tables(&mut s, "nodes") {
                let instance = r.get_with(&mut n, "instance", |i: String| {
                    if crate::exec_auth::is_hostport(&i) {
                        Ok(i)
                    } else {
                        Err(format!("{i:?} is not host:port"))
                    }
                });
                let node = r.get_with(&mut n, "node", |v: String| {
                    if crate::exec_auth::is_node_name(&v) {
                        Ok(v)
                    } else {
                        Err(format!("{v:?} is not a host name"))
                    }
                });
                let url = r.get_with(&mut n, "url", http_url);
                match (instance, node) {
                    (Some(instance), Some(node)) => {
                        if a.nodes.iter().any(|x| x.instance == instance) {
                            r.error(&n, "instance", format!("{instance} is listed twice"));
                        }
                        let url = url.unwrap_or_else(|| format!("http://{instance}"));
                        a.nodes.push(StaticAgent {
                            instance,
                            node,
                            url,
                        });
                    }
                    (i, nd) => {
                        if i.is_none() && n.keys().iter().all(|k| k != "instance") {
                            r.error(&n, "", "needs instance");
                        }
                        if nd.is_none() && n.keys().iter().all(|k| k != "node") {
                            r.error(&n, "", "needs node");
                        }
                    }
                }
                r.finish(n);
            }
            if a.prometheus_job.is_some() && c.prometheus.is_none() {
                r.error(
                    &s,
                    "prometheus_job",
                    "needs [prometheus] url to read the job's targets from",
                );
            }
            c.agents = Some(a);
            r.finish(s);
        }

        if let Some(mut s) = r.table(&mut root, "rbac") {
            let ids = |v: Vec<String>| match v
                .iter()
                .find(|id| id.trim().is_empty() || id.contains(char::is_whitespace))
            {
                Some(bad) => Err(format!("{bad:?} is not a user id")),
                None => Ok(v),
            };
            c.rbac.admins = r.get_with(&mut s, "admins", ids).unwrap_or_default();
            c.rbac.operators = r.get_with(&mut s, "operators", ids).unwrap_or_default();
            c.rbac.people = crate::config::people::read_people(&mut r, &mut s);
            c.rbac.max_silence =
                r.get_with(
                    &mut s,
                    "max_silence",
                    |v: String| match humantime::parse_duration(&v) {
                        Ok(d) if d.as_secs() >= 60 => Ok(d),
                        Ok(_) => Err(format!("must be at least 1m, got {v:?}")),
                        Err(e) => Err(format!("{v:?} is not a duration like \"24h\": {e}")),
                    },
                );
            r.finish(s);
        }

        if let Some(mut s) = r.table(&mut root, "approvals") {
            if let Some(v) = r.get_with(&mut s, "expiry_secs", positive_secs) {
                c.approvals.expiry = v;
            }
            r.finish(s);
        }

        if let Some(mut s) = r.table(&mut root, "lifecycle") {
            crate::config::lifecycle::read_section(&mut r, &mut s, &mut c.lifecycle);
            r.finish(s);
        }

        c.reports = reports::read_reports(
            &mut r,
            &mut root,
            reports::Available {
                slack: c.slack.is_some(),
                discord: c.discord.is_some(),
                email: c.email.is_some(),
                prometheus: c.prometheus.is_some(),
            },
        );

        r.finish(root);
        r.into_result().map(|()| c)
    }
}

fn tier(s: String) -> Result<Tier, String> {
    Tier::parse(&s).ok_or_else(|| format!("{s:?} is not a tier (P1, P2, P3 or P4)"))
}

/// Discord ids: a decimal snowflake, as a string or an integer.
fn snowflake(v: toml::Value) -> Result<u64, String> {
    let parsed = match &v {
        toml::Value::String(s) => s.trim().parse::<u64>().ok(),
        toml::Value::Integer(n) => u64::try_from(*n).ok(),
        _ => None,
    };
    match parsed {
        Some(n) if n > 0 => Ok(n),
        _ => Err(format!("{v} is not a Discord id (a decimal number)")),
    }
}

/// An absolute http(s) URL, without a trailing slash.
fn http_url(u: String) -> Result<String, String> {
    match reqwest::Url::parse(u.trim()) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {
            Ok(u.trim().trim_end_matches('/').to_string())
        }
        Ok(_) => Err("must be an http:// or https:// URL".to_string()),
        Err(e) => Err(format!("not a URL: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> Vec<String> {
        match BotConfig::from_str(Path::new("bot.toml"), text) {
            Ok(_) => Vec::new(),
            Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
        }
    }

    /// Issue 22, observation 7: chat configured, no `[rbac]`: everybody got
    /// "⛔ ack needs the operator or admin role" and nothing said why.
    #[test]
    fn chat_without_anybody_holding_a_role_warns() {
        let slack = "[slack]\nbot_token = \"xoxb-t\"\nsigning_secret = \"s\"\n";
        let c = BotConfig::from_str(Path::new("b.toml"), slack).unwrap();
        let w = c.warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].starts_with("chat is configured ([slack]) but nobody has a role"),
            "{w:?}"
        );
        let with_role = format!("{slack}[rbac]\noperators = [\"U0OPER\"]\n");
        let c = BotConfig::from_str(Path::new("b.toml"), &with_role).unwrap();
        assert!(c.warnings().is_empty(), "{:?}", c.warnings());
        // No chat, no roles needed.
        let c = BotConfig::from_str(Path::new("b.toml"), "").unwrap();
        assert!(c.warnings().is_empty());
    }

    /// Issue 22, observation 8: runbooks with no agent to run node steps on.
    #[test]
    fn runbooks_with_an_empty_agent_inventory_warn() {
        let c = BotConfig::from_str(Path::new("b.toml"), "[runbooks]\ndir = \"rb\"\n").unwrap();
        let w = c.warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].starts_with("the agent inventory is empty"), "{w:?}");
        let c = BotConfig::from_str(
            Path::new("b.toml"),
            "[runbooks]\ndir = \"rb\"\n[agents]\n[[agents.nodes]]\ninstance = \"10.0.0.1:9949\"\nnode = \"n1\"\n",
        )
        .unwrap();
        assert!(c.warnings().is_empty(), "{:?}", c.warnings());
    }

    /// Issue 22, observation 10: `check-config` accepted a runbooks
    /// directory that does not exist.
    #[test]
    fn check_config_refuses_a_missing_runbooks_directory() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bot.toml");
        let missing = dir.path().join("no-runbooks");
        std::fs::write(&path, format!("[runbooks]\ndir = {:?}\n", missing)).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = BotConfig::from_file(&path).unwrap_err().to_string();
        assert!(
            e.contains("runbooks.dir") && e.contains("is not a directory"),
            "{e}"
        );
        std::fs::create_dir(&missing).unwrap();
        BotConfig::from_file(&path).unwrap();
    }

    #[test]
    fn empty_file_is_console_only_on_the_default_port() {
        let c = BotConfig::from_str(Path::new("b.toml"), "").unwrap();
        assert_eq!(c.server.listen.port(), DEFAULT_BOT_PORT);
        assert!(c.server.listen.ip().is_loopback());
        assert_eq!(c.routing.destinations.len(), 1);
        assert!(c.routing.destinations[0].console);
        assert_eq!(c.approvals.expiry, Duration::from_secs(900));
    }

    #[test]
    fn renotify_tiers_and_correlation_window_default_and_parse() {
        let c = BotConfig::from_str(Path::new("b.toml"), "").unwrap();
        assert_eq!(c.routing.renotify_tiers, vec![Tier::P1, Tier::P2]);
        assert_eq!(c.routing.correlation_window, Duration::from_secs(600));
        let c = BotConfig::from_str(
            Path::new("b.toml"),
            "[routing]\nrenotify_tiers = [\"P1\", \"p3\"]\ncorrelation_window = \"0\"\n",
        )
        .unwrap();
        assert!(c.routing.renotifies(Tier::P3) && !c.routing.renotifies(Tier::P2));
        assert!(c.routing.correlation_window.is_zero());
        let e = BotConfig::from_str(
            Path::new("b.toml"),
            "[routing]\nrenotify_tiers = [\"P9\"]\ncorrelation_window = \"soon\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("routing.renotify_tiers: \"P9\" is not a tier"),
            "{e}"
        );
        assert!(e.contains("routing.correlation_window"), "{e}");
    }

    #[test]
    fn every_error_is_reported_at_once() {
        let text = r#"
[server]
listen = "nowhere"
bogus = 1
max_body_bytes = 10

[discord]
bot_token = "abc"
public_key = "zz"

[routing]
default_tier = "P9"
severity = { page = "P0" }

[[routing.destinations]]
tiers = ["P1", "P7"]
matchers = { team = "(" }
slack_channel = "C0123"

[[routing.destinations]]
tiers = ["P3"]

[agents]
node_label = "bad-label"

[approvals]
expiry_secs = 0
"#;
        expect_test::expect![[r#"
            [
                "bot.toml:3: server.listen: \"nowhere\" is not an address:port (invalid socket address syntax)",
                "bot.toml:4: server.bogus: unknown key",
                "bot.toml:5: server.max_body_bytes: must be between 1024 and 268435456, got 10",
                "bot.toml:9: discord.public_key: must be 64 hex digits: Invalid character 'z' at position 0",
                "bot.toml:12: routing.default_tier: \"P9\" is not a tier (P1, P2, P3 or P4)",
                "bot.toml:13: routing.severity: page: \"P0\" is not a tier (P1, P2, P3 or P4)",
                "bot.toml:16: routing.destinations[0].tiers: \"P7\" is not a tier (P1, P2, P3 or P4)",
                "bot.toml:17: routing.destinations[0].matchers: team: invalid regex \"(\": unclosed group",
                "bot.toml:18: routing.destinations[0].slack_channel: needs a [slack] section with bot_token",
                "bot.toml:20: routing.destinations[1]: names no target: set slack_channel, discord_channel, webhook_url, pagerduty_routing_key, email or console = true",
                "bot.toml:24: agents.node_label: \"bad-label\" is not a Prometheus label name",
                "bot.toml:27: approvals.expiry_secs: must be a positive number of seconds, got 0",
            ]
        "#]]
        .assert_debug_eq(&errors(text));
    }

    #[test]
    fn secrets_come_from_files_and_never_print() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("slack.token");
        std::fs::write(&p, "xoxb-very-secret\n").unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let text = format!(
            "[slack]\nbot_token_file = {:?}\nsigning_secret = \"sign-me\"\n[server]\nwebhook_token = \"hook-secret\"\n[[routing.destinations]]\nslack_channel = \"C1\"\nwebhook_url = \"https://hooks.example.com/T/abc?token=zzz\"\n",
            p.display().to_string()
        );
        let c = BotConfig::from_str(Path::new("b.toml"), &text).unwrap();
        let slack = c.slack.as_ref().unwrap();
        assert_eq!(slack.bot_token.expose(), "xoxb-very-secret");
        assert_eq!(slack.api_url, DEFAULT_SLACK_API_URL);
        let dbg = format!("{c:?}");
        for s in [
            "very-secret",
            "sign-me",
            "hook-secret",
            "zzz",
            "hooks.example.com",
        ] {
            assert!(!dbg.contains(s), "{s} leaked in {dbg}");
        }
    }

    #[test]
    fn chat_sections_parse() {
        let text = r#"
[discord]
bot_token = "t"
application_id = "123456789012345678"
public_key = "0000000000000000000000000000000000000000000000000000000000000000"
api_url = "http://127.0.0.1:1/"
[alertmanager]
url = "http://127.0.0.1:9093"
[prometheus]
url = "http://127.0.0.1:9090"
[runbooks]
dir = "runbooks"
[agents]
prometheus_job = "gpuops"
refresh_secs = 30
[[agents.nodes]]
instance = "10.0.0.17:9949"
node = "gpu-node-17"
[[agents.nodes]]
instance = "gpu-node-18.example.com:9949"
node = "gpu-node-18"
url = "https://gpu-node-18.example.com:9949"
[rbac]
admins = ["U0ADMIN"]
operators = ["U0OPER", "123"]
[approvals]
expiry_secs = 60
"#;
        let c = BotConfig::from_str(Path::new("b.toml"), text).unwrap();
        let d = c.discord.unwrap();
        assert_eq!(d.application_id, Some(123456789012345678));
        assert_eq!(d.api_url, "http://127.0.0.1:1");
        let a = c.agents.unwrap();
        assert_eq!(a.prometheus_job.as_deref(), Some("gpuops"));
        assert_eq!(a.refresh, Duration::from_secs(30));
        assert_eq!(a.node_label, "node");
        assert!(a.signing_key.is_none());
        assert_eq!(
            a.nodes,
            [
                StaticAgent {
                    instance: "10.0.0.17:9949".into(),
                    node: "gpu-node-17".into(),
                    url: "http://10.0.0.17:9949".into()
                },
                StaticAgent {
                    instance: "gpu-node-18.example.com:9949".into(),
                    node: "gpu-node-18".into(),
                    url: "https://gpu-node-18.example.com:9949".into()
                }
            ]
        );
        assert_eq!(c.rbac.operators, ["U0OPER", "123"]);
        assert_eq!(c.approvals.expiry, Duration::from_secs(60));
        assert_eq!(c.runbooks.dir, Some(PathBuf::from("runbooks")));
    }

    #[test]
    fn agents_errors_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("exec.key");
        let signer = crate::exec_auth::ExecSigner::generate();
        std::fs::write(&key, signer.private_pem().unwrap().expose()).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let text = format!(
            "[agents]\nurl_template = \"http://{{instance}}\"\nsecret = \"s\"\nsigning_key_file = {:?}\nprometheus_job = \"gpuops\"\n[[agents.nodes]]\ninstance = \"10.0.0.1\"\nnode = \"10.0.0.1:9949\"\n",
            key.display().to_string()
        );
        let e = errors(&text);
        assert_eq!(e.len(), 6, "{e:?}");
        assert!(
            e[0].contains("agents.url_template") && e[0].contains("replaced"),
            "{e:?}"
        );
        assert!(
            e[1].contains("agents.secret") && e[1].contains("gpuops keygen"),
            "{e:?}"
        );
        assert!(
            e[2].contains("signing_key_file") && e[2].contains("chmod 600"),
            "{e:?}"
        );
        assert!(
            e[3].contains("prometheus_job") && e[3].contains("[prometheus]"),
            "{e:?}"
        );
        assert!(
            e[4].contains("instance") && e[4].contains("host:port"),
            "{e:?}"
        );
        assert!(e[5].contains("node") && e[5].contains("host name"), "{e:?}");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let ok = format!(
            "[agents]\nsigning_key_file = {:?}\n",
            key.display().to_string()
        );
        let c = BotConfig::from_str(Path::new("b.toml"), &ok).unwrap();
        let k = c.agents.unwrap().signing_key.unwrap();
        assert_eq!(k.key_id(), signer.key_id());
        assert!(!format!("{k:?}").contains("PRIVATE"));
    }

    #[test]
    fn people_parse_and_an_account_belongs_to_one_person() {
        let text = r#"
[rbac]
admins = ["U0ALICE", "discord:123"]
[[rbac.people]]
name = "alice"
accounts = ["slack:U0ALICE", "discord:123"]
[[rbac.people]]
name = "bob"
accounts = ["slack:U0BOB"]
"#;
        let c = BotConfig::from_str(Path::new("b.toml"), text).unwrap();
        assert_eq!(c.rbac.person_of("slack:U0ALICE"), "alice");
        assert_eq!(c.rbac.person_of("discord:123"), "alice");
        assert_eq!(c.rbac.person_of("slack:U0BOB"), "bob");
        assert_eq!(c.rbac.person_of("slack:U0CAROL"), "slack:U0CAROL");
        let bad = r#"
[[rbac.people]]
name = "alice"
accounts = ["slack:U0ALICE", "discord:123"]
[[rbac.people]]
name = "mallory"
accounts = ["discord:123"]
[[rbac.people]]
name = "alice"
accounts = ["U0BOB"]
[[rbac.people]]
name = "a b"
accounts = []
[[rbac.people]]
accounts = ["slack:U0X"]
nick = "x"
"#;
        expect_test::expect![[r#"
            [
                "bot.toml:7: rbac.people[1].accounts: \"discord:123\" already belongs to \"alice\"; an account belongs to at most one person",
                "bot.toml:9: rbac.people[2].name: person \"alice\" is listed twice",
                "bot.toml:10: rbac.people[2].accounts: \"U0BOB\" is not an account: write slack:<user id> or discord:<user id>",
                "bot.toml:12: rbac.people[3].name: \"a b\" is not a person's name (1 to 64 letters, digits, '.', '_' or '-')",
                "bot.toml:13: rbac.people[3].accounts: must list at least one account",
                "bot.toml:14: rbac.people[4]: needs name",
                "bot.toml:16: rbac.people[4].nick: unknown key",
            ]
        "#]]
        .assert_debug_eq(&errors(bad));
    }

    #[test]
    fn public_listener_needs_a_webhook_token_or_an_explicit_allow() {
        let text = "[server]\nlisten = \"0.0.0.0:9950\"\n";
        expect_test::expect![[r#"
            [
                "bot.toml:2: server.listen: 0.0.0.0:9950 is not a loopback address and server.webhook_token is not set, so anyone who reaches it could post alerts; set webhook_token (or webhook_token_file), listen on 127.0.0.1, or set server.allow_unauthenticated_webhooks = true",
            ]
        "#]]
        .assert_debug_eq(&errors(text));
        assert_eq!(errors("[server]\nlisten = \"[::]:9950\"\n").len(), 1);
        for ok in [
            "[server]\nlisten = \"127.0.0.1:9950\"\n",
            "[server]\nlisten = \"[::1]:9950\"\n",
            "[server]\nlisten = \"0.0.0.0:9950\"\nwebhook_token = \"t\"\n",
            "[server]\nlisten = \"0.0.0.0:9950\"\nallow_unauthenticated_webhooks = true\n",
        ] {
            assert_eq!(errors(ok), Vec::<String>::new(), "{ok}");
        }
    }

    #[test]
    fn paging_errors_are_reported_at_once_with_their_lines() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("leads.key");
        std::fs::write(&good, "R0123456789abcdef0123456789abcde\n").unwrap();
        let bad = dir.path().join("bad.key");
        std::fs::write(&bad, "too-short\n").unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        for f in [&good, &bad] {
            std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let text = format!(
            r#"
[pagerduty]
api_url = "ftp://x"

[email]
smtp_url = "smtp://mail.example.com:25"
from = "not a mailbox"
username = "gpuops"

[digest]
schedule = "0 0 25 * * *"
timezone = "Mars/Olympus"

[[routing.destinations]]
tiers = ["P1"]
pagerduty_routing_key = "short"
[routing.destinations.escalation]
after = "soon"
notify = ["slack:C0LEADS", "email:nobody", "pagerduty:{good}", "pagerduty:{bad}", "sms:123"]
max_repeats = 2

[[routing.destinations]]
tiers = ["P3"]
email = ["ops@example.com", "@@"]
digest = true
"#,
            good = good.display(),
            bad = bad.display()
        );
        let errs = errors(&text)
            .join("\n")
            .replace(&dir.path().display().to_string(), "DIR");
        expect_test::expect![[r#"
            bot.toml:3: pagerduty.api_url: "ftp://x" is not an http(s) URL
            bot.toml:6: email.smtp_url: plain SMTP to mail.example.com, which is not loopback: use ?tls=required (STARTTLS) or smtps://, or say ?tls=none
            bot.toml:7: email.from: "not a mailbox" is not a mailbox (Invalid input)
            bot.toml:8: email.username: needs password or password_file
            bot.toml:11: digest.schedule: "0 0 25 * * *" is not a cron expression (Hours must be less than 23. ('25' specified.))
            bot.toml:12: digest.timezone: "Mars/Olympus" is not an IANA time zone name (e.g. "Europe/Berlin")
            bot.toml:14: routing.destinations[0]: names no target: set slack_channel, discord_channel, webhook_url, pagerduty_routing_key, email or console = true
            bot.toml:16: routing.destinations[0].pagerduty_routing_key: is not an Events API v2 routing key (32 letters and digits, got 5 characters)
            bot.toml:18: routing.destinations[0].escalation.after: "soon" is not a duration like "90s", "10m", "1h" (expected number at 0)
            bot.toml:19: routing.destinations[0].escalation.notify: "slack:C0LEADS" needs a [slack] section with bot_token
            bot.toml:19: routing.destinations[0].escalation.notify: "email:nobody": "nobody" is not an email address (Missing domain or user)
            bot.toml:19: routing.destinations[0].escalation.notify: "pagerduty:DIR/bad.key": the key in DIR/bad.key is not an Events API v2 routing key (32 letters and digits, got 9 characters)
            bot.toml:19: routing.destinations[0].escalation.notify: "sms:123" is not a target: use slack:CHANNEL, email:ADDRESS or pagerduty:ROUTING_KEY_FILE
            bot.toml:20: routing.destinations[0].escalation.max_repeats: needs repeat_every
            bot.toml:22: routing.destinations[1]: names no target: set slack_channel, discord_channel, webhook_url, pagerduty_routing_key, email or console = true
            bot.toml:24: routing.destinations[1].email: "@@" is not an email address (Invalid email user)
            bot.toml:25: routing.destinations[1].digest: needs a [digest] section with schedule"#]].assert_eq(&errs);
        let ok = format!(
            r#"
[slack]
bot_token = "xoxb-1"
[email]
smtp_url = "smtp://127.0.0.1:2525"
from = "gpuops <gpuops@example.com>"
[digest]
schedule = "0 9 * * 1-5"
timezone = "Europe/Berlin"
[[routing.destinations]]
tiers = ["P1", "P2"]
slack_channel = "C0PAGE"
pagerduty_routing_key_file = "{good}"
[routing.destinations.escalation]
after = "10m"
notify = ["slack:C0LEADS", "email:gpu-leads@example.com", "pagerduty:{good}"]
repeat_every = "30m"
max_repeats = 3
[[routing.destinations]]
tiers = ["P4"]
email = ["gpu-capacity@example.com"]
digest = true
"#,
            good = good.display()
        );
        let c = BotConfig::from_str(Path::new("bot.toml"), &ok).unwrap();
        let d = &c.routing.destinations[0];
        let e = d.escalation.as_ref().unwrap();
        assert_eq!(e.after, Duration::from_secs(600));
        assert_eq!(e.steps(), 4);
        assert_eq!(e.notify.len(), 3);
        assert_eq!(
            c.routing.pagerduty_keys.len(),
            1,
            "the same key twice is one"
        );
        assert_eq!(c.digest.as_ref().unwrap().schedule_text, "0 0 9 * * 2-6");
        let keys = |tier| {
            c.routing
                .targets(tier, &BTreeMap::new())
                .iter()
                .map(|t| t.key())
                .collect::<Vec<_>>()
        };
        assert_eq!(keys(Tier::P1)[0], "slack:C0PAGE");
        assert!(keys(Tier::P1)[1].starts_with("pagerduty:"));
        assert!(keys(Tier::P4).is_empty(), "P4 waits for the digest");
        assert!(!format!("{c:?}").contains("R0123456789abcdef"));
    }

    #[test]
    fn shipped_example_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/bot.example.toml");
        // As text: the checked-out example is world-readable, and a live
        // config holding inline secrets like its placeholders may not be.
        let text = std::fs::read_to_string(&path).unwrap();
        if let Err(e) = BotConfig::from_str(&path, &text) {
            panic!("{e}");
        }
    }
}
