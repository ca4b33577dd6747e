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
use crate::config::{
    anchored_regex, positive_secs, read_file, read_log_section, read_secret, read_web_limits,
    ConfigErrors, Reader, Secret, WebLimits,
};
use crate::routing::{default_severity_map, Destination, Routing, Tier};

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
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Bearer token AlertManager must send (`http_config.authorization`).
    pub webhook_token: Option<Secret>,
    pub max_body_bytes: usize,
    /// Connection cap and timeouts of the HTTP server.
    pub limits: WebLimits,
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// The SQLite database file.
    pub path: PathBuf,
    /// How long raw webhook payloads, and groups resolved since, are kept.
    pub webhook_retention: Duration,
    /// `full` (default): every commit is fsynced, survives power loss;
    /// `normal`: survives process crashes only, faster on slow disks.
    pub sync: crate::store::Sync,
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

#[derive(Debug, Clone)]
pub struct AgentsConfig {
    /// E.g. `http://{instance}`; `{instance}` is the alert's instance label.
    pub url_template: String,
    /// HMAC secret shared with the agents' `--exec-secret`.
    pub secret: Option<Secret>,
}

#[derive(Debug, Clone, Default)]
pub struct RbacConfig {
    pub admins: Vec<String>,
    pub operators: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct ApprovalsConfig {
    pub expiry: Duration,
}

/// `$STATE_DIRECTORY/bot.db` under systemd, else `./gpuops-bot.db`.
pub fn default_store_path() -> PathBuf {
    match std::env::var_os("STATE_DIRECTORY") {
        Some(dirs) if !dirs.is_empty() => {
            let s = dirs.to_string_lossy().to_string();
            let first = s.split(':').next().unwrap_or("").to_string();
            PathBuf::from(first).join("bot.db")
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
                max_body_bytes: DEFAULT_MAX_BODY_BYTES,
                limits: WebLimits::default(),
            },
            store: StoreConfig {
                path: default_store_path(),
                webhook_retention: Duration::from_secs(7 * 86_400),
                sync: crate::store::Sync::Full,
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
        }
    }
}

impl BotConfig {
    /// Reads and validates `path`, reporting every error in it at once.
    pub fn from_file(path: &Path) -> Result<BotConfig, ConfigErrors> {
        let text = read_file(path)?;
        BotConfig::from_str(path, &text)
    }

    /// Validates `text`, which came from `path` (used in error messages).
    pub fn from_str(path: &Path, text: &str) -> Result<BotConfig, ConfigErrors> {
        let (mut r, mut root) = Reader::parse(path, text)?;
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
            read_web_limits(&mut r, &mut s, &mut c.server.limits);
            r.finish(s);
        }

        if let Some(mut s) = r.table(&mut root, "store") {
            if let Some(v) = r.get_with(&mut s, "path", |p: PathBuf| {
                if p.as_os_str().is_empty() {
                    Err("must not be empty".to_string())
                } else {
                    Ok(p)
                }
            }) {
                c.store.path = v;
            }
            if let Some(v) = r.get_with(&mut s, "webhook_retention_secs", positive_secs) {
                c.store.webhook_retention = v;
            }
            if let Some(v) = r.get_with(&mut s, "sync", |v: String| match v.as_str() {
                "full" => Ok(crate::store::Sync::Full),
                "normal" => Ok(crate::store::Sync::Normal),
                _ => Err(format!("must be \"full\" or \"normal\", got {v:?}")),
            }) {
                c.store.sync = v;
            }
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
                };
                if dest.targets().is_empty() {
                    r.error(
                        &d,
                        "",
                        "names no target: set slack_channel, discord_channel, webhook_url or console = true",
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
                } else {
                    Ok(p)
                }
            });
            r.finish(s);
        }

        if let Some(mut s) = r.table(&mut root, "agents") {
            let template = r.get_with(&mut s, "url_template", |t: String| {
                if !t.contains("{instance}") {
                    return Err(format!("{t:?} must contain {{instance}}"));
                }
                http_url(t.replace("{instance}", "node-1.example:9949"))
                    .map(|_| t.clone())
                    .map_err(|e| format!("{t:?}: {e}"))
            });
            let secret = read_secret(&mut r, &mut s, "secret", "secret_file");
            match template {
                Some(url_template) => {
                    c.agents = Some(AgentsConfig {
                        url_template,
                        secret,
                    })
                }
                None if s.keys().iter().all(|k| k != "url_template") => {
                    r.error(&s, "", "needs url_template")
                }
                None => {}
            }
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
            r.finish(s);
        }

        if let Some(mut s) = r.table(&mut root, "approvals") {
            if let Some(v) = r.get_with(&mut s, "expiry_secs", positive_secs) {
                c.approvals.expiry = v;
            }
            r.finish(s);
        }

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
url_template = "http://node"

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
                "bot.toml:20: routing.destinations[1]: names no target: set slack_channel, discord_channel, webhook_url or console = true",
                "bot.toml:24: agents.url_template: \"http://node\" must contain {instance}",
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
url_template = "http://{instance}"
secret = "s"
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
        assert_eq!(c.agents.unwrap().url_template, "http://{instance}");
        assert_eq!(c.rbac.operators, ["U0OPER", "123"]);
        assert_eq!(c.approvals.expiry, Duration::from_secs(60));
        assert_eq!(c.runbooks.dir, Some(PathBuf::from("runbooks")));
    }

    #[test]
    fn shipped_example_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/bot.example.toml");
        if let Err(e) = BotConfig::from_file(&path) {
            panic!("{e}");
        }
    }
}
