//! The command line: clap definitions only. Dispatch lives in `main.rs`,
//! behaviour in the role modules. A build without the `bot` feature (the
//! node build) has no bot subcommands: clap neither offers nor accepts them.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "gpuops", version)]
#[cfg_attr(
    feature = "bot",
    command(
        about = "GPU cluster operations: a node agent exporting USE metrics for Prometheus, and a chat-ops bot for AlertManager"
    )
)]
#[cfg_attr(
    not(feature = "bot"),
    command(
        about = "GPU cluster operations: the node agent exporting USE metrics for Prometheus (the node build, without the bot)"
    )
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node agent: serve /metrics, /healthz, /readyz, /v1/events and (when enabled) /v1/exec.
    #[cfg(feature = "agent")]
    Agent(AgentArgs),
    /// Print one full exposition to stdout and exit (0 even if some collectors fail).
    #[cfg(feature = "agent")]
    Collect(CollectArgs),
    /// Validate a configuration file, reporting every error at once.
    CheckConfig(CheckConfigArgs),
    /// Run the chat-ops bot: AlertManager webhooks in, Slack and Discord out.
    #[cfg(feature = "bot")]
    Bot(BotArgs),
    /// Validate, list, or run codified runbooks.
    #[command(subcommand)]
    Runbook(RunbookCommand),
    /// Print the bot's audit records.
    #[cfg(feature = "bot")]
    Audit(AuditArgs),
    /// The open alert groups in the bot's store, or one node's (by its name or instance).
    #[cfg(feature = "bot")]
    Status(StatusArgs),
    /// The nodes out of service in the bot's store, most GPU-hours lost first.
    #[cfg(feature = "bot")]
    Nodes(NodesArgs),
    /// Write a new Ed25519 key pair for signing agent exec requests.
    #[cfg(feature = "bot")]
    Keygen(KeygenArgs),
    /// Manage the bot's store: apply schema migrations, copy SQLite to PostgreSQL.
    #[cfg(feature = "bot")]
    #[command(subcommand)]
    Store(StoreCommand),
    /// Set up the bot's Discord application.
    #[cfg(feature = "bot")]
    #[command(subcommand)]
    Discord(DiscordCommand),
    /// Scheduled health reports: preview one into files, or send one now.
    #[cfg(feature = "bot")]
    #[command(subcommand)]
    Report(ReportCommand),
}

/// `gpuops store ...`.
#[cfg(feature = "bot")]
#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Apply the schema migrations the configured store lacks ([store] path or url).
    Migrate(StoreMigrateArgs),
    /// Copy every table of a SQLite store into an empty PostgreSQL database.
    Copy(StoreCopyArgs),
}

/// `gpuops store migrate`.
#[cfg(feature = "bot")]
#[derive(Debug, Args)]
pub struct StoreMigrateArgs {
    /// Bot configuration file (its [store] section)
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// `gpuops store copy`.
#[cfg(feature = "bot")]
#[derive(Debug, Args)]
pub struct StoreCopyArgs {
    /// The SQLite store: sqlite:PATH (or a plain path)
    #[arg(long, value_name = "sqlite:PATH")]
    pub from: String,
    /// The PostgreSQL database: postgres://USER@HOST/DB (default: [store] url of --config); give its password with --password-file, not in this URL
    #[arg(long, value_name = "URL")]
    pub to: Option<String>,
    /// Bot configuration file whose [store] url, password_file and ca_file are used
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// File holding the PostgreSQL password (instead of putting it in the URL)
    #[arg(long, value_name = "FILE")]
    pub password_file: Option<PathBuf>,
}

#[cfg(feature = "bot")]
#[derive(Debug, Subcommand)]
pub enum DiscordCommand {
    /// Register the /gpuops slash command globally for [discord] application_id
    Register(DiscordRegisterArgs),
}

/// `gpuops discord register`.
#[cfg(feature = "bot")]
#[derive(Debug, Args)]
pub struct DiscordRegisterArgs {
    /// Bot configuration file (TOML) with [discord] bot_token and application_id
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: PathBuf,
}

/// `gpuops report`.
#[cfg(feature = "bot")]
#[derive(Debug, Subcommand)]
pub enum ReportCommand {
    /// Write DIR/report.md, DIR/report.html and one PNG per chart; post nothing
    Preview(ReportPreviewArgs),
    /// Post the report to its destinations now (through the outbox)
    Send(ReportSendArgs),
}

/// Which report, for which period.
#[cfg(feature = "bot")]
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Bot configuration file (TOML) with the [[reports]] entry
    #[arg(long, short = 'c', value_name = "FILE", env = "GPUOPS_BOT_CONFIG")]
    pub config: PathBuf,
    /// The report's name ([[reports]] name)
    #[arg(long)]
    pub name: String,
    /// End of the period, RFC 3339 (e.g. 2026-11-28T08:00:00+01:00) [default: now]
    #[arg(long, value_name = "RFC3339")]
    pub at: Option<String>,
}

#[cfg(feature = "bot")]
#[derive(Debug, Args)]
pub struct ReportPreviewArgs {
    #[command(flatten)]
    pub report: ReportArgs,
    /// Directory to write the files into (created if missing)
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

#[cfg(feature = "bot")]
#[derive(Debug, Args)]
pub struct ReportSendArgs {
    #[command(flatten)]
    pub report: ReportArgs,
    /// Give up waiting for the deliveries after this long (they stay in the outbox for the bot)
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2m")]
    pub timeout: std::time::Duration,
}

/// `gpuops keygen`.
#[cfg(feature = "bot")]
#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Directory to write NAME.key (private, 0600, for the bot) and NAME.pub (for the agents)
    #[arg(long, value_name = "DIR", default_value = ".")]
    pub out: PathBuf,
    /// File name stem
    #[arg(long, default_value = "exec")]
    pub name: String,
    /// Replace existing files
    #[arg(long)]
    pub force: bool,
}

/// Where the host's pseudo filesystems are (for containers and fixture trees).
#[derive(Debug, Clone, Default, Args)]
pub struct HostArgs {
    /// procfs mount point [default: /proc]
    #[arg(long, value_name = "DIR")]
    pub procfs: Option<PathBuf>,
    /// sysfs mount point [default: /sys]
    #[arg(long, value_name = "DIR")]
    pub sysfs: Option<PathBuf>,
    /// Root of the host filesystem, for mount statistics [default: /]
    #[arg(long, value_name = "DIR")]
    pub rootfs: Option<PathBuf>,
    /// Kernel log: the /dev/kmsg device, or a regular file of records [default: /dev/kmsg]
    #[arg(long, value_name = "PATH")]
    pub kmsg: Option<PathBuf>,
    /// Replay GPU readings from a JSON fixture instead of NVML (tests and demos; labelled fake)
    #[arg(long, value_name = "FILE")]
    pub gpu_fake: Option<PathBuf>,
    /// Agent configuration file (TOML)
    #[arg(long, short = 'c', value_name = "FILE", env = "GPUOPS_AGENT_CONFIG")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    #[command(flatten)]
    pub host: HostArgs,
    /// Address to listen on [default: 0.0.0.0:9949]
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Enable POST /v1/exec for requests signed by this public key (PEM; repeat for a key rotation)
    #[arg(long = "exec-public-key", value_name = "FILE")]
    pub exec_public_keys: Vec<PathBuf>,
    /// This node's name, which signed exec requests must name [default: the host name up to the first dot]
    #[arg(long, value_name = "NAME")]
    pub node_name: Option<String>,
    /// This node's own runbook directory (steps run by /v1/exec come only from here)
    #[arg(long, value_name = "DIR")]
    pub runbooks: Option<PathBuf>,
    /// TLS and basic auth, in Prometheus exporter-toolkit's web config format (YAML; re-read when it changes)
    #[arg(long = "web.config.file", value_name = "FILE")]
    pub web_config_file: Option<PathBuf>,
    /// Log format [default: text, or the config's log.format]
    #[arg(long, value_parser = ["text", "json"])]
    pub log_format: Option<String>,
}

#[derive(Debug, Args)]
pub struct CollectArgs {
    /// Collect once and exit (the only mode; required for clarity)
    #[arg(long, required = true)]
    pub once: bool,
    #[command(flatten)]
    pub host: HostArgs,
}

#[derive(Debug, Args)]
#[group(required = true, multiple = true)]
pub struct CheckConfigArgs {
    /// An agent configuration file
    #[arg(long, value_name = "FILE")]
    pub agent: Option<PathBuf>,
    /// A bot configuration file
    #[cfg(feature = "bot")]
    #[arg(long, value_name = "FILE")]
    pub bot: Option<PathBuf>,
}

#[cfg(feature = "bot")]
#[derive(Debug, Args)]
pub struct BotArgs {
    /// Bot configuration file (TOML); without one the bot logs alerts to the console
    #[arg(long, short = 'c', value_name = "FILE", env = "GPUOPS_BOT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on (overrides server.listen)
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Log format [default: text, or the config's log.format]
    #[arg(long, value_parser = ["text", "json"])]
    pub log_format: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum RunbookCommand {
    /// Validate every runbook in DIR, reporting every error at once
    Check {
        /// Runbook directory
        dir: PathBuf,
    },
    /// One line per runbook: id, title, triggers
    List {
        /// Runbook directory [default: ./runbooks, then /usr/share/gpuops/runbooks]
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Run a runbook's steps on this machine
    Run(RunbookRunArgs),
}

#[derive(Debug, Args)]
pub struct RunbookRunArgs {
    /// Runbook id
    pub id: String,
    /// Runbook directory [default: ./runbooks, then /usr/share/gpuops/runbooks]
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// A parameter, name=value (repeatable)
    #[arg(long = "param", short = 'p', value_name = "K=V")]
    pub params: Vec<String>,
    /// Print each step with its rendered argv; run nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Run steps that need approval without asking
    #[arg(long)]
    pub yes: bool,
    /// Run only this step (repeatable; like `run ID:step` in chat)
    #[arg(long, value_name = "NAME")]
    pub step: Vec<String>,
}

/// `gpuops status`.
#[cfg(feature = "bot")]
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Bot configuration file (its [store] and [[agents.nodes]])
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: PathBuf,
    /// A node's name (as [[agents.nodes]] names it) or an instance (host:port)
    pub node: Option<String>,
}

/// `gpuops nodes`.
#[cfg(feature = "bot")]
#[derive(Debug, Args)]
pub struct NodesArgs {
    /// Bot configuration file (its [store])
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: PathBuf,
}

#[cfg(feature = "bot")]
#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Bot configuration file (for the store path)
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Only records newer than this (e.g. 1h, 7d)
    #[arg(long, value_parser = humantime::parse_duration)]
    pub since: Option<std::time::Duration>,
    /// Print one runbook run (e.g. r1a2b3c) with every step's stored output
    #[arg(long, value_name = "RUN", conflicts_with = "group")]
    pub run: Option<String>,
    /// The incident timeline of one alert group (its id, as in `/gpuops alerts`)
    #[arg(long, value_name = "ID", requires = "markdown")]
    pub group: Option<i64>,
    /// With --group: write the timeline as Markdown (for a post-mortem)
    #[arg(long, requires = "group")]
    pub markdown: bool,
}
