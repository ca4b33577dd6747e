//! The `[routing]` data: [`Tier`] and the default severity map, [`Target`],
//! [`Escalation`], [`Destination`] and [`Routing`] as read from the config.
//! Plain validated data; the routing decisions (classify, targets) live in
//! the `routing` module, which re-exports these types.

use std::collections::BTreeMap;
use std::fmt;

use sha2::Digest as _;

use crate::secret::Secret;

/// Response tiers, most severe first (`P1 < P2` in ordering).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum Tier {
    P1,
    P2,
    P3,
    P4,
}

impl Tier {
    pub const ALL: [Tier; 4] = [Tier::P1, Tier::P2, Tier::P3, Tier::P4];

    pub fn as_str(self) -> &'static str {
        match self {
            Tier::P1 => "P1",
            Tier::P2 => "P2",
            Tier::P3 => "P3",
            Tier::P4 => "P4",
        }
    }

    /// Parses `P1`..`P4` (case-insensitive).
    pub fn parse(s: &str) -> Option<Tier> {
        match s.trim().to_ascii_uppercase().as_str() {
            "P1" => Some(Tier::P1),
            "P2" => Some(Tier::P2),
            "P3" => Some(Tier::P3),
            "P4" => Some(Tier::P4),
            _ => None,
        }
    }

    /// What the tier means to a responder (shown in messages).
    pub fn meaning(self) -> &'static str {
        match self {
            Tier::P1 => "page, 5 min response",
            Tier::P2 => "page + chat",
            Tier::P3 => "chat",
            Tier::P4 => "digest",
        }
    }

    /// RGB colour for the message's side bar.
    pub fn colour(self) -> u32 {
        match self {
            Tier::P1 => 0xD0_00_00,
            Tier::P2 => 0xF0_6A_00,
            Tier::P3 => 0xE8_B4_00,
            Tier::P4 => 0x3A_7B_D5,
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The built-in severity label values (lower case) and their tiers.
pub const DEFAULT_SEVERITIES: &[(&str, Tier)] = &[
    ("critical", Tier::P1),
    ("p1", Tier::P1),
    ("sev-1", Tier::P1),
    ("sev1", Tier::P1),
    ("high", Tier::P2),
    ("error", Tier::P2),
    ("p2", Tier::P2),
    ("sev-2", Tier::P2),
    ("sev2", Tier::P2),
    ("warning", Tier::P3),
    ("warn", Tier::P3),
    ("p3", Tier::P3),
    ("sev-3", Tier::P3),
    ("sev3", Tier::P3),
    ("info", Tier::P4),
    ("low", Tier::P4),
    ("p4", Tier::P4),
    ("sev-4", Tier::P4),
    ("sev4", Tier::P4),
];

/// How one severity value was classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Classified {
    pub tier: Tier,
    /// The label was missing or not in the map; `tier` is the default tier.
    pub unknown: bool,
}

/// A place messages go. The key (see [`Target::key`]) is what the store
/// remembers, so it never contains a secret.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    Slack(String),
    Discord(u64),
    /// A generic JSON webhook, known by a hash of its URL.
    Webhook(String),
    Console,
    /// A PagerDuty Events API v2 integration, known by a hash of its
    /// routing key (see [`pagerduty_id`]).
    PagerDuty(String),
    /// One email address.
    Email(String),
}

impl Target {
    /// `slack:C0123`, `discord:123`, `webhook:<12 hex>`, `console`.
    pub fn key(&self) -> String {
        match self {
            Target::Slack(c) => format!("slack:{c}"),
            Target::Discord(c) => format!("discord:{c}"),
            Target::Webhook(h) => format!("webhook:{h}"),
            Target::Console => "console".into(),
            Target::PagerDuty(h) => format!("pagerduty:{h}"),
            Target::Email(a) => format!("email:{a}"),
        }
    }

    pub fn parse_key(key: &str) -> Option<Target> {
        match key.split_once(':') {
            Some(("slack", c)) if !c.is_empty() => Some(Target::Slack(c.into())),
            Some(("discord", c)) => c.parse().ok().map(Target::Discord),
            Some(("webhook", h)) if !h.is_empty() => Some(Target::Webhook(h.into())),
            Some(("pagerduty", h)) if !h.is_empty() => Some(Target::PagerDuty(h.into())),
            Some(("email", a)) if !a.is_empty() => Some(Target::Email(a.into())),
            None if key == "console" => Some(Target::Console),
            _ => None,
        }
    }

    /// The platform name used in metrics and logs.
    pub fn platform(&self) -> &'static str {
        match self {
            Target::Slack(_) => "slack",
            Target::Discord(_) => "discord",
            Target::Webhook(_) => "webhook",
            Target::Console => "console",
            Target::PagerDuty(_) => "pagerduty",
            Target::Email(_) => "email",
        }
    }
}

/// The stable, secret-free id of a webhook URL.
pub fn webhook_id(url: &Secret) -> String {
    let digest = sha2::Sha256::digest(url.expose().as_bytes());
    hex::encode(&digest[..6])
}

/// The stable, secret-free id of a PagerDuty routing key.
pub fn pagerduty_id(routing_key: &Secret) -> String {
    let digest = sha2::Sha256::digest(routing_key.expose().as_bytes());
    hex::encode(&digest[..6])
}

/// `[routing.destinations.escalation]`: while a group this destination
/// received is neither acknowledged nor resolved, `after` its first
/// notification it goes to `notify`, then again every `repeat_every`, at
/// most `max_repeats` more times.
#[derive(Debug, Clone, PartialEq)]
pub struct Escalation {
    pub after: std::time::Duration,
    pub notify: Vec<Target>,
    pub repeat_every: Option<std::time::Duration>,
    pub max_repeats: u32,
}

impl Escalation {
    /// How many steps there are in all (the first plus the repeats).
    pub fn steps(&self) -> u32 {
        if self.repeat_every.is_some() {
            1 + self.max_repeats
        } else {
            1
        }
    }
}

/// One `[[routing.destinations]]` entry, validated.
#[derive(Debug, Clone)]
pub struct Destination {
    pub tiers: Vec<Tier>,
    /// Label name → anchored regex; all must match the group's common labels.
    pub matchers: Vec<(String, regex::Regex)>,
    pub slack_channel: Option<String>,
    pub discord_channel: Option<u64>,
    pub webhook_url: Option<Secret>,
    pub console: bool,
    /// Events API v2 routing key (`pagerduty_routing_key[_file]`).
    pub pagerduty_routing_key: Option<Secret>,
    /// Email addresses (`email`), validated.
    pub email: Vec<String>,
    /// P4 groups wait for the `[digest]` instead of one message each.
    pub digest: bool,
    pub escalation: Option<Escalation>,
}

impl Destination {
    /// A destination with only tiers and a Slack channel (tests, defaults).
    pub fn new(tiers: Vec<Tier>) -> Destination {
        Destination {
            tiers,
            matchers: Vec::new(),
            slack_channel: None,
            discord_channel: None,
            webhook_url: None,
            console: false,
            pagerduty_routing_key: None,
            email: Vec::new(),
            digest: false,
            escalation: None,
        }
    }

    /// Every target this destination names.
    pub fn targets(&self) -> Vec<Target> {
        let mut out = Vec::new();
        if let Some(c) = &self.slack_channel {
            out.push(Target::Slack(c.clone()));
        }
        if let Some(c) = self.discord_channel {
            out.push(Target::Discord(c));
        }
        if let Some(u) = &self.webhook_url {
            out.push(Target::Webhook(webhook_id(u)));
        }
        if self.console {
            out.push(Target::Console);
        }
        if let Some(k) = &self.pagerduty_routing_key {
            out.push(Target::PagerDuty(pagerduty_id(k)));
        }
        for a in &self.email {
            out.push(Target::Email(a.clone()));
        }
        out
    }

    pub fn matches(&self, tier: Tier, labels: &BTreeMap<String, String>) -> bool {
        self.tiers.contains(&tier)
            && self
                .matchers
                .iter()
                .all(|(name, re)| re.is_match(labels.get(name).map(String::as_str).unwrap_or("")))
    }
}

/// The validated `[routing]` section.
#[derive(Debug, Clone)]
pub struct Routing {
    pub default_tier: Tier,
    /// Lower-case severity value → tier (defaults plus overrides).
    pub severity: BTreeMap<String, Tier>,
    pub destinations: Vec<Destination>,
    /// `pagerduty_id(key)` → routing key, for every key named by a
    /// destination or an escalation (`pagerduty:FILE`).
    pub pagerduty_keys: BTreeMap<String, Secret>,
    /// `renotify_tiers`: tiers whose open groups notify again when an alert
    /// joins them (Slack `reply_broadcast`, a Discord reply, a PagerDuty
    /// `trigger` on the same incident); the other tiers get a plain thread
    /// reply. Default [`DEFAULT_RENOTIFY_TIERS`].
    pub renotify_tiers: Vec<Tier>,
    /// `correlation_window`: P1/P2 groups about the same instance and GPU
    /// within this long share one PagerDuty incident (`dedup_key`); zero
    /// turns that off. Default [`DEFAULT_CORRELATION_WINDOW`].
    pub correlation_window: std::time::Duration,
}

/// Tiers that notify again when an alert joins an open group, by default.
pub const DEFAULT_RENOTIFY_TIERS: [Tier; 2] = [Tier::P1, Tier::P2];
/// How long a GPU's first page collects the others about it, by default.
pub const DEFAULT_CORRELATION_WINDOW: std::time::Duration = std::time::Duration::from_secs(600);

impl Routing {
    /// Whether an alert joining an open group of `tier` notifies again.
    pub fn renotifies(&self, tier: Tier) -> bool {
        self.renotify_tiers.contains(&tier)
    }
}

impl Default for Routing {
    /// Everything to the console: the no-configuration mode.
    fn default() -> Self {
        Routing {
            default_tier: Tier::P3,
            severity: default_severity_map(),
            destinations: vec![Destination {
                console: true,
                ..Destination::new(Tier::ALL.to_vec())
            }],
            pagerduty_keys: BTreeMap::new(),
            renotify_tiers: DEFAULT_RENOTIFY_TIERS.to_vec(),
            correlation_window: DEFAULT_CORRELATION_WINDOW,
        }
    }
}

pub fn default_severity_map() -> BTreeMap<String, Tier> {
    DEFAULT_SEVERITIES
        .iter()
        .map(|(k, t)| (k.to_string(), *t))
        .collect()
}
