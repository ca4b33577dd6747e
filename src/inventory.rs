//! The bot's inventory of agents: which `instance` labels belong to agents
//! the bot may send node steps to, and each agent's node name and URL.
//!
//! Two sources: the configuration's `[[agents.nodes]]` list, and the targets
//! of one Prometheus job (`GET /api/v1/targets?state=active` on `[prometheus]
//! url`, re-read every `refresh_secs`, and at most every 10 s when an
//! instance is not found). An alert naming any other address gets no request
//! from the bot: [`Inventory::lookup`] says why, and the caller refuses the
//! run. A discovered agent's node name comes from a target label
//! (`node_label`, then `nodename`), else from the target's host name when
//! it is a DNS name: never from a fragment of an IP address.
//!
//! No signing and no runbook logic here; the runbook engine sees this module
//! only through [`AgentDirectory`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use serde::Deserialize;

use crate::config::BotConfig;
use crate::exec_auth::is_node_name;
use crate::runbook::engine::{AgentAddr, AgentClient, AgentDirectory, Executor, NodeSteps};

/// Deadline of one read of Prometheus's targets.
pub const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(5);
/// A miss re-reads the targets at most this often.
pub const MISS_REFRESH: Duration = Duration::from_secs(10);

/// The agents the bot knows.
pub struct Inventory {
    statics: HashMap<String, AgentAddr>,
    discovery: Option<Discovery>,
    discovered: tokio::sync::Mutex<Discovered>,
}

struct Discovery {
    targets_url: String,
    job: String,
    node_label: String,
    refresh: Duration,
    http: reqwest::Client,
}

#[derive(Default)]
struct Discovered {
    agents: HashMap<String, AgentAddr>,
    /// Targets of the job with no usable node name, and why.
    unnamed: HashMap<String, String>,
    at: Option<Instant>,
    error: Option<String>,
}

impl Inventory {
    /// The inventory `[agents]` describes (`None` without an `[agents]` section).
    pub fn from_config(cfg: &BotConfig) -> Option<Inventory> {
        let a = cfg.agents.as_ref()?;
        let statics = a
            .nodes
            .iter()
            .map(|n| {
                (
                    n.instance.clone(),
                    AgentAddr {
                        instance: n.instance.clone(),
                        node: n.node.clone(),
                        url: n.url.clone(),
                    },
                )
            })
            .collect();
        let discovery = match (&a.prometheus_job, &cfg.prometheus) {
            (Some(job), Some(p)) => Some(Discovery {
                targets_url: format!(
                    "{}/api/v1/targets?state=active",
                    p.url.trim_end_matches('/')
                ),
                job: job.clone(),
                node_label: a.node_label.clone(),
                refresh: a.refresh,
                http: reqwest::Client::builder()
                    .timeout(DISCOVERY_TIMEOUT)
                    .connect_timeout(Duration::from_secs(3))
                    .redirect(reqwest::redirect::Policy::none())
                    .build()
                    .unwrap_or_else(|_| reqwest::Client::new()),
            }),
            _ => None,
        };
        Some(Inventory {
            statics,
            discovery,
            discovered: tokio::sync::Mutex::new(Discovered::default()),
        })
    }

    /// A fixed inventory (tests).
    pub fn fixed(agents: Vec<AgentAddr>) -> Inventory {
        Inventory {
            statics: agents
                .into_iter()
                .map(|a| (a.instance.clone(), a))
                .collect(),
            discovery: None,
            discovered: tokio::sync::Mutex::new(Discovered::default()),
        }
    }

    /// The agent behind an alert's `instance` label, or why there is none.
    pub async fn lookup(&self, instance: &str) -> Result<AgentAddr, String> {
        if let Some(a) = self.statics.get(instance) {
            return Ok(a.clone());
        }
        let Some(d) = &self.discovery else {
            return Err(format!(
                "{instance} is not a known agent (not listed in [[agents.nodes]]); the bot sends node steps only to its own agents"
            ));
        };
        let mut cache = self.discovered.lock().await;
        let stale = |c: &Discovered, max: Duration| c.at.is_none_or(|t| t.elapsed() >= max);
        if stale(&cache, d.refresh)
            || (!cache.agents.contains_key(instance) && stale(&cache, MISS_REFRESH))
        {
            refresh(d, &mut cache).await;
        }
        if let Some(a) = cache.agents.get(instance) {
            return Ok(a.clone());
        }
        if let Some(why) = cache.unnamed.get(instance) {
            return Err(format!("agent {instance} has no node name: {why}"));
        }
        match &cache.error {
            Some(e) if cache.agents.is_empty() => Err(format!(
                "cannot check {instance} against Prometheus job {:?}: {e}",
                d.job
            )),
            _ => Err(format!(
                "{instance} is not a known agent (not in [[agents.nodes]] nor a target of Prometheus job {:?}); the bot sends node steps only to its own agents",
                d.job
            )),
        }
    }

    /// Re-reads the targets now (start-up log line); the number of agents known.
    pub async fn refresh_now(&self) -> Result<usize, String> {
        let Some(d) = &self.discovery else {
            return Ok(self.statics.len());
        };
        let mut cache = self.discovered.lock().await;
        refresh(d, &mut cache).await;
        match &cache.error {
            Some(e) => Err(e.clone()),
            None => Ok(self.statics.len() + cache.agents.len()),
        }
    }
}

impl AgentDirectory for Inventory {
    fn agent<'a>(&'a self, instance: &'a str) -> BoxFuture<'a, Result<AgentAddr, String>> {
        Box::pin(self.lookup(instance))
    }
}

impl Inventory {
    /// The names a person reads, as the inventory knows them now: every
    /// `[[agents.nodes]]` entry and the last discovered targets (no
    /// request is made; a discovery never read yet adds nothing).
    pub async fn names(&self) -> NodeNames {
        let mut by_instance: HashMap<String, String> = self
            .statics
            .values()
            .map(|a| (a.instance.clone(), a.node.clone()))
            .collect();
        let mut blind = None;
        let node_label = match &self.discovery {
            Some(d) => {
                let cache = self.discovered.lock().await;
                for (instance, a) in &cache.agents {
                    by_instance
                        .entry(instance.clone())
                        .or_insert_with(|| a.node.clone());
                }
                blind = match (&cache.error, cache.at) {
                    (Some(e), _) => Some(format!(
                        "Prometheus could not be asked for job {:?}'s targets ({e})",
                        d.job
                    )),
                    (None, None) => Some(format!(
                        "Prometheus has not been asked for job {:?}'s targets yet",
                        d.job
                    )),
                    (None, Some(_)) => None,
                };
                d.node_label.clone()
            }
            None => "node".to_string(),
        };
        NodeNames {
            by_instance,
            node_label,
            blind,
        }
    }
}

/// One name per node: the map between an alert's `instance` and the node's
/// name that every human-facing text uses (chat, PagerDuty, email, digest,
/// reports, `status`, the timeline). Built from the inventory
/// ([`Inventory::names`]); an instance the inventory does not know gets the
/// name the inventory would derive for it (the `node_label` label, then
/// `nodename`, then the host part of a DNS name), else none, and the caller
/// shows the instance itself. Never a fragment of an IP address.
#[derive(Debug, Clone)]
pub struct NodeNames {
    by_instance: HashMap<String, String>,
    node_label: String,
    /// Why the discovered part of the map may be missing or old (the last
    /// read of Prometheus's targets failed, or none was made).
    blind: Option<String>,
}

impl Default for NodeNames {
    fn default() -> NodeNames {
        NodeNames {
            by_instance: HashMap::new(),
            node_label: "node".to_string(),
            blind: None,
        }
    }
}

impl NodeNames {
    /// A fixed map of `(instance, node)` pairs (tests, callers without an
    /// inventory).
    pub fn fixed<I, A, B>(pairs: I) -> NodeNames
    where
        I: IntoIterator<Item = (A, B)>,
        A: Into<String>,
        B: Into<String>,
    {
        NodeNames {
            by_instance: pairs
                .into_iter()
                .map(|(a, b)| (a.into(), b.into()))
                .collect(),
            node_label: "node".to_string(),
            blind: None,
        }
    }

    /// Why discovered nodes may be missing from this map (Prometheus could
    /// not be asked), for texts that would otherwise say a node is unknown.
    pub fn blind(&self) -> Option<&str> {
        self.blind.as_deref()
    }

    /// The node's name for an alert's `instance` and labels, or `None` when
    /// nothing names it (the caller then shows the instance).
    pub fn name_of(
        &self,
        instance: Option<&str>,
        labels: &std::collections::BTreeMap<String, String>,
    ) -> Option<String> {
        if let Some(n) = instance.and_then(|i| self.by_instance.get(i)) {
            return Some(n.clone());
        }
        for l in [self.node_label.as_str(), "node", "nodename"] {
            if let Some(v) = labels.get(l).filter(|v| is_node_name(v)) {
                return Some(v.clone());
            }
        }
        let host = host_of(instance?);
        if host.parse::<std::net::IpAddr>().is_ok() {
            return None;
        }
        let short = host.split('.').next().unwrap_or("");
        is_node_name(short).then(|| short.to_string())
    }

    /// The names `[[agents.nodes]]` gives (no discovery: for the CLI).
    pub fn from_config(cfg: &BotConfig) -> NodeNames {
        let mut names = NodeNames::default();
        if let Some(a) = &cfg.agents {
            names.node_label = a.node_label.clone();
            names.by_instance = a
                .nodes
                .iter()
                .map(|n| (n.instance.clone(), n.node.clone()))
                .collect();
        }
        names
    }

    /// The node's name for an instance alone (no labels).
    pub fn name_of_instance(&self, instance: &str) -> Option<String> {
        self.name_of(Some(instance), &std::collections::BTreeMap::new())
    }

    /// The instances the inventory maps to `node` (a name a person typed).
    pub fn instances_of(&self, node: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .by_instance
            .iter()
            .filter(|(_, n)| n.as_str() == node)
            .map(|(i, _)| i.clone())
            .collect();
        v.sort();
        v
    }

    /// The inventory's own name for an instance (no derivation from
    /// labels or DNS).
    pub fn inventory_name(&self, instance: &str) -> Option<String> {
        self.by_instance.get(instance).cloned()
    }

    /// Every node name the inventory knows, sorted.
    pub fn known_nodes(&self) -> Vec<String> {
        let mut v: Vec<String> = self.by_instance.values().cloned().collect();
        v.sort();
        v.dedup();
        v
    }
}

/// Wraps an inventory for the engine.
pub fn directory(inv: Inventory) -> Arc<dyn AgentDirectory> {
    Arc::new(inv)
}

async fn refresh(d: &Discovery, cache: &mut Discovered) {
    cache.at = Some(Instant::now());
    match fetch(d).await {
        Ok((agents, unnamed)) => {
            tracing::debug!(
                job = %d.job,
                agents = agents.len(),
                unnamed = unnamed.len(),
                "agent inventory refreshed from Prometheus"
            );
            for (instance, why) in &unnamed {
                tracing::warn!(instance = %instance, reason = %why, "agent target has no node name; node steps to it are refused");
            }
            cache.agents = agents;
            cache.unnamed = unnamed;
            cache.error = None;
        }
        Err(e) => {
            // Keep the last good list: a Prometheus restart must not stop runbooks.
            tracing::warn!(job = %d.job, error = %e, "cannot refresh the agent inventory; keeping the last list");
            cache.error = Some(e);
        }
    }
}

/// Start-up check of `[agents] prometheus_job` (the bot's start and
/// `gpuops check-config`): `None` when no job is configured or the job has
/// targets in Prometheus, else a warning that names the jobs Prometheus
/// does have (or why it could not be asked).
pub async fn job_warning(cfg: &BotConfig) -> Option<String> {
    let inv = Inventory::from_config(cfg)?;
    let d = inv.discovery.as_ref()?;
    match targets_body(d).await.and_then(|body| jobs_of(&body)) {
        Err(e) => Some(format!(
            "cannot check that Prometheus job {:?} ([agents] prometheus_job) has targets: {e}",
            d.job
        )),
        Ok(jobs) if jobs.contains(&d.job) => None,
        Ok(jobs) if jobs.is_empty() => Some(format!(
            "Prometheus job {:?} ([agents] prometheus_job) has no targets, and Prometheus scrapes no job at all: node steps to its agents will be refused",
            d.job
        )),
        Ok(jobs) => Some(format!(
            "Prometheus job {:?} ([agents] prometheus_job) has no targets: node steps to its agents will be refused; the jobs Prometheus has: {}",
            d.job,
            jobs.into_iter().collect::<Vec<_>>().join(", ")
        )),
    }
}

/// The jobs of the active targets in a `/api/v1/targets` answer.
fn jobs_of(body: &str) -> Result<std::collections::BTreeSet<String>, String> {
    Ok(active_targets(body)?
        .into_iter()
        .filter_map(|t| t.labels.get("job").cloned())
        .collect())
}

/// The active targets of a `/api/v1/targets` answer, or why there are none.
fn active_targets(body: &str) -> Result<Vec<ActiveTarget>, String> {
    let r: TargetsResponse =
        serde_json::from_str(body).map_err(|e| format!("unreadable targets answer: {e}"))?;
    if r.status != "success" {
        return Err(format!(
            "Prometheus answered {}: {}",
            r.status,
            r.error.unwrap_or_default()
        ));
    }
    Ok(r.data.map(|d| d.active).unwrap_or_default())
}

#[derive(Deserialize)]
struct TargetsResponse {
    status: String,
    #[serde(default)]
    data: Option<TargetsData>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Deserialize)]
struct TargetsData {
    #[serde(default, rename = "activeTargets")]
    active: Vec<ActiveTarget>,
}

/// One of Prometheus's `activeTargets`.
#[derive(Deserialize)]
struct ActiveTarget {
    #[serde(default)]
    labels: HashMap<String, String>,
    #[serde(default, rename = "scrapeUrl")]
    scrape_url: String,
}

type Parsed = (HashMap<String, AgentAddr>, HashMap<String, String>);

async fn fetch(d: &Discovery) -> Result<Parsed, String> {
    parse_targets(&targets_body(d).await?, &d.job, &d.node_label)
}

/// `GET /api/v1/targets?state=active` on `[prometheus] url`: the body, or
/// why not (the error without credentials).
async fn targets_body(d: &Discovery) -> Result<String, String> {
    let resp = d
        .http
        .get(&d.targets_url)
        .send()
        .await
        .map_err(|e| crate::telemetry::redact(&format!("GET /api/v1/targets: {e}")))?;
    let status = resp.status();
    let body = resp
        .text()
        .await
        .map_err(|e| format!("GET /api/v1/targets: {e}"))?;
    if !status.is_success() {
        return Err(format!("GET /api/v1/targets: HTTP {}", status.as_u16()));
    }
    Ok(body)
}

/// The agents of `job` in a `/api/v1/targets` answer, and the targets
/// without a usable node name.
fn parse_targets(body: &str, job: &str, node_label: &str) -> Result<Parsed, String> {
    let mut agents = HashMap::new();
    let mut unnamed = HashMap::new();
    for t in active_targets(body)? {
        if t.labels.get("job").map(String::as_str) != Some(job) {
            continue;
        }
        let Some(instance) = t.labels.get("instance").cloned() else {
            continue;
        };
        let url = match base_url(&t.scrape_url) {
            Some(u) => u,
            None => {
                unnamed.insert(
                    instance,
                    format!("scrape URL {:?} is unusable", t.scrape_url),
                );
                continue;
            }
        };
        match node_name(&t.labels, node_label, &instance) {
            Ok(node) => {
                agents.insert(
                    instance.clone(),
                    AgentAddr {
                        instance,
                        node,
                        url,
                    },
                );
            }
            Err(why) => {
                unnamed.insert(instance, why);
            }
        }
    }
    Ok((agents, unnamed))
}

/// `scheme://host:port` of a scrape URL.
fn base_url(scrape_url: &str) -> Option<String> {
    let u = reqwest::Url::parse(scrape_url).ok()?;
    if !matches!(u.scheme(), "http" | "https") {
        return None;
    }
    let host = u.host_str()?;
    Some(match u.port() {
        Some(p) => format!("{}://{host}:{p}", u.scheme()),
        None => format!("{}://{host}", u.scheme()),
    })
}

/// A target's node name: `node_label`, then `nodename`, then the host part
/// of `instance` when it is a DNS name (up to the first dot).
fn node_name(
    labels: &HashMap<String, String>,
    node_label: &str,
    instance: &str,
) -> Result<String, String> {
    for l in [node_label, "nodename"] {
        if let Some(v) = labels.get(l) {
            if is_node_name(v) {
                return Ok(v.clone());
            }
            return Err(format!("label {l}={v:?} is not a host name"));
        }
    }
    let host = host_of(instance);
    if host.parse::<std::net::IpAddr>().is_ok() {
        return Err(format!(
            "the target is an IP address and has no {node_label:?} label: add one in Prometheus's relabel_configs, or list the agent in [[agents.nodes]]"
        ));
    }
    let short = host.split('.').next().unwrap_or("");
    if is_node_name(short) {
        Ok(short.to_string())
    } else {
        Err(format!("{host:?} is not a host name"))
    }
}

/// The host of `host:port`, `[v6]:port` or a bare host.
fn host_of(instance: &str) -> &str {
    if let Some(rest) = instance.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match instance.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) && !h.contains(':') => h,
        _ => instance,
    }
}

/// Where the bot's node steps go, from `[agents]`: the inventory (also
/// returned, for the chat side's run checks) and a signing client, or why
/// node steps cannot run.
pub fn node_steps(cfg: &BotConfig) -> (Option<Arc<dyn AgentDirectory>>, NodeSteps) {
    let Some(inventory) = Inventory::from_config(cfg).map(directory) else {
        return (
            None,
            NodeSteps::Unavailable(
                "node steps need an [agents] section (signing_key_file, and [[agents.nodes]] or prometheus_job) in the bot configuration"
                    .into(),
            ),
        );
    };
    let agents = cfg.agents.as_ref();
    let Some(key) = agents.and_then(|a| a.signing_key.clone()) else {
        return (
            Some(inventory),
            NodeSteps::Unavailable(
                "node steps need [agents] signing_key_file (the private key from `gpuops keygen`)"
                    .into(),
            ),
        );
    };
    let transport = agents.map(|a| a.transport.clone()).unwrap_or_default();
    let node = match AgentClient::new(inventory.clone(), key).with_transport(&transport) {
        Ok(c) => NodeSteps::Agent(c),
        Err(e) => NodeSteps::Unavailable(e),
    };
    (Some(inventory), node)
}

impl Executor {
    /// The bot's executor from its configuration: node steps as
    /// [`node_steps`] says; PromQL to `[prometheus] url`; bot-side commands
    /// through the real process runner.
    pub fn for_bot(cfg: &BotConfig) -> Executor {
        let (inventory, node) = node_steps(cfg);
        Executor::new(
            Arc::new(crate::runbook::exec::ProcessRunner),
            node,
            cfg.prometheus.as_ref().map(|p| p.url.clone()),
        )
        .with_directory(inventory)
    }
}

/// An agent's answer larger than this is refused (the agent holds 2048
/// events).
const MAX_EVENTS_BODY: usize = 4 * 1024 * 1024;

/// `GET /v1/events` on the inventory's agents, through `[agents]`'s
/// transport (the runbook engine's client: TLS trust, client certificate)
/// and basic auth. Chat's node summary and the report's OOM victims both
/// read events through it; callers bound it with their own deadline.
pub struct EventsClient {
    http: Result<reqwest::Client, String>,
    basic_auth: Option<(String, crate::config::Secret)>,
}

impl EventsClient {
    pub fn from_config(cfg: &BotConfig) -> EventsClient {
        let transport = cfg
            .agents
            .as_ref()
            .map(|a| a.transport.clone())
            .unwrap_or_default();
        EventsClient {
            http: crate::runbook::engine::agent_http_client(&transport),
            basic_auth: transport.basic_auth,
        }
    }

    /// The agent's events since `since` (Unix seconds, or seconds back from
    /// now below 1e9, as the agent reads it), or why not.
    pub async fn events(
        &self,
        agent_url: &str,
        since: f64,
    ) -> Result<Vec<serde_json::Value>, String> {
        let http = self
            .http
            .as_ref()
            .map_err(|e| format!("agents' client: {e}"))?;
        let base = agent_url.trim_end_matches('/');
        let mut req = http.get(format!("{base}/v1/events?since={}", since.floor().max(0.0)));
        if let Some((user, password)) = &self.basic_auth {
            req = req.basic_auth(user, Some(password.expose()));
        }
        let resp = req.send().await.map_err(|e| {
            let why = if e.is_connect() {
                "connection refused or no route".to_string()
            } else if e.is_timeout() {
                "timed out".to_string()
            } else {
                crate::telemetry::redact(&e.to_string())
            };
            format!("agent unreachable ({why})")
        })?;
        let status = resp.status();
        if !status.is_success() {
            return Err(format!("agent answered HTTP {}", status.as_u16()));
        }
        if resp
            .content_length()
            .is_some_and(|n| n > MAX_EVENTS_BODY as u64)
        {
            return Err("agent's answer is too large".into());
        }
        let body = resp
            .bytes()
            .await
            .map_err(|_| "agent's answer was cut off".to_string())?;
        if body.len() > MAX_EVENTS_BODY {
            return Err("agent's answer is too large".into());
        }
        events_of(&body)
    }
}

/// The events of a `/v1/events` answer.
pub fn events_of(body: &[u8]) -> Result<Vec<serde_json::Value>, String> {
    #[derive(serde::Deserialize)]
    struct Body {
        #[serde(default)]
        events: Vec<serde_json::Value>,
    }
    serde_json::from_slice::<Body>(body)
        .map(|b| b.events)
        .map_err(|_| "agent's answer is not a /v1/events list".to_string())
}

/// How long a node's OOM kills are remembered: an agent (reachable or not)
/// is asked at most this often for alert messages.
pub const VICTIMS_TTL: Duration = Duration::from_secs(60);
/// Deadline of one message's look-ups of OOM victims (all nodes together):
/// a delivery waits at most this long, once per [`VICTIMS_TTL`].
pub const VICTIMS_DEADLINE: Duration = Duration::from_secs(2);
/// Nodes asked for one message (the rest of a storm shows no victim).
pub const VICTIMS_MAX_NODES: usize = 32;
/// How far back a victim look-up reads the agent's events (seconds).
const VICTIMS_WINDOW_SECS: f64 = 3600.0;

/// One process the OOM killer killed, as an agent's `/v1/events` records it.
#[derive(Debug, Clone, PartialEq)]
pub struct OomKill {
    /// Unix seconds.
    pub timestamp: f64,
    pub pid: Option<u32>,
    pub process: Option<String>,
    /// The memory cgroup (a systemd unit or a container's scope).
    pub cgroup: Option<String>,
}

/// The OOM kills among a `/v1/events` answer's events, oldest first (other
/// kinds and unreadable entries are skipped).
pub fn oom_kills(events: &[serde_json::Value]) -> Vec<OomKill> {
    let mut v: Vec<OomKill> = events
        .iter()
        .filter(|e| e.get("type").and_then(|t| t.as_str()) == Some("oom_kill"))
        .filter_map(|e| {
            let timestamp = e.get("timestamp")?.as_f64().filter(|t| t.is_finite())?;
            let text = |k: &str| {
                e.get(k)
                    .and_then(|v| v.as_str())
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
            };
            Some(OomKill {
                timestamp,
                pid: e
                    .get("pid")
                    .and_then(|p| p.as_u64())
                    .and_then(|p| u32::try_from(p).ok()),
                process: text("process"),
                cgroup: text("cgroup").filter(|c| c != "/"),
            })
        })
        .collect();
    v.sort_by(|a, b| a.timestamp.total_cmp(&b.timestamp));
    v
}

type Kills = Result<Vec<OomKill>, String>;

/// The bot's view of its nodes for human-facing text, shared by the outbox
/// worker and the chat handlers: the names ([`Identity::names`]) and, for
/// OOM alerts, the victims from the agents' `/v1/events`
/// ([`Identity::oom_kills`]: a short deadline, answers and failures cached
/// for [`VICTIMS_TTL`], so an unreachable agent never holds up delivery).
pub struct Identity {
    inventory: Option<Inventory>,
    events: EventsClient,
    cache: std::sync::Mutex<HashMap<String, (Instant, Kills)>>,
}

impl Identity {
    /// From `[agents]` (no `[agents]`: names only from alert labels and DNS).
    pub fn from_config(cfg: &BotConfig) -> Identity {
        Identity::new(Inventory::from_config(cfg), EventsClient::from_config(cfg))
    }

    pub fn new(inventory: Option<Inventory>, events: EventsClient) -> Identity {
        Identity {
            inventory,
            events,
            cache: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// The inventory's names now (see [`Inventory::names`]); discovered
    /// targets are re-read first when older than `refresh_secs`, within
    /// [`VICTIMS_DEADLINE`] (a slow Prometheus delays one message once per
    /// refresh period, and the last list stays).
    pub async fn names(&self) -> NodeNames {
        let Some(inv) = &self.inventory else {
            return NodeNames::default();
        };
        if let Some(d) = &inv.discovery {
            let _ = tokio::time::timeout(VICTIMS_DEADLINE, async {
                let mut cache = inv.discovered.lock().await;
                if cache.at.is_none_or(|t| t.elapsed() >= d.refresh) {
                    refresh(d, &mut cache).await;
                }
            })
            .await;
        }
        inv.names().await
    }

    /// The names as last read, with no request to Prometheus (the webhook
    /// path: AlertManager's answer never waits on discovery).
    pub async fn known_names(&self) -> NodeNames {
        match &self.inventory {
            Some(inv) => inv.names().await,
            None => NodeNames::default(),
        }
    }

    /// The OOM kills each instance's agent holds (the last hour), or why
    /// they are unknown; instances outside the inventory are left out. At
    /// most [`VICTIMS_MAX_NODES`] agents are asked, all within
    /// [`VICTIMS_DEADLINE`]; answers are cached for [`VICTIMS_TTL`].
    pub async fn oom_kills(&self, instances: &[String]) -> HashMap<String, Kills> {
        let Some(inv) = &self.inventory else {
            return HashMap::new();
        };
        let mut out = HashMap::new();
        let mut ask = Vec::new();
        {
            let cache = self
                .cache
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for i in instances.iter().take(VICTIMS_MAX_NODES) {
                match cache.get(i) {
                    Some((at, got)) if at.elapsed() < VICTIMS_TTL => {
                        out.insert(i.clone(), got.clone());
                    }
                    _ => ask.push(i.clone()),
                }
            }
        }
        if ask.is_empty() {
            return out;
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let since = now - VICTIMS_WINDOW_SECS;
        let asks = ask.iter().map(|instance| async move {
            // Only the inventory's own agents are asked: statics at once,
            // discovered ones from the last list (no refresh for a miss).
            let Some(url) = inv.known_url(instance).await else {
                return (instance.clone(), None);
            };
            let got = tokio::time::timeout(VICTIMS_DEADLINE, self.events.events(&url, since))
                .await
                .unwrap_or_else(|_| {
                    Err(format!(
                        "agent did not answer within {} s",
                        VICTIMS_DEADLINE.as_secs_f64()
                    ))
                })
                .map(|e| oom_kills(&e));
            (instance.clone(), Some(got))
        });
        let answers = futures_util::future::join_all(asks).await;
        let mut cache = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        cache.retain(|_, (at, _)| at.elapsed() < VICTIMS_TTL);
        for (instance, got) in answers {
            if let Some(got) = got {
                cache.insert(instance.clone(), (Instant::now(), got.clone()));
                out.insert(instance, got);
            }
        }
        out
    }
}

impl Inventory {
    /// The agent URL of an instance the inventory already knows (static, or
    /// in the last discovered list); no request is made.
    async fn known_url(&self, instance: &str) -> Option<String> {
        if let Some(a) = self.statics.get(instance) {
            return Some(a.url.clone());
        }
        self.discovery.as_ref()?;
        let cache = self.discovered.lock().await;
        cache.agents.get(instance).map(|a| a.url.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TARGETS: &str = r#"{"status":"success","data":{"activeTargets":[
      {"labels":{"instance":"gpu-node-17.example.com:9949","job":"gpuops"},"scrapeUrl":"http://gpu-node-17.example.com:9949/metrics","health":"up"},
      {"labels":{"instance":"10.0.0.18:9949","job":"gpuops","node":"gpu-node-18"},"scrapeUrl":"https://10.0.0.18:9949/metrics","health":"up"},
      {"labels":{"instance":"10.0.0.19:9949","job":"gpuops"},"scrapeUrl":"http://10.0.0.19:9949/metrics","health":"down"},
      {"labels":{"instance":"10.0.0.20:9100","job":"node"},"scrapeUrl":"http://10.0.0.20:9100/metrics","health":"up"}
    ],"droppedTargets":[]}}"#;

    #[test]
    fn targets_of_the_job_with_node_names_never_from_ip_fragments() {
        let (agents, unnamed) = parse_targets(TARGETS, "gpuops", "node").unwrap();
        assert_eq!(agents.len(), 2, "{:?}", agents.keys());
        let a = &agents["gpu-node-17.example.com:9949"];
        assert_eq!(a.node, "gpu-node-17");
        assert_eq!(a.url, "http://gpu-node-17.example.com:9949");
        let b = &agents["10.0.0.18:9949"];
        assert_eq!(b.node, "gpu-node-18");
        assert_eq!(b.url, "https://10.0.0.18:9949");
        assert!(unnamed["10.0.0.19:9949"].contains("IP address"));
        assert!(!agents.contains_key("10.0.0.20:9100"));
        assert!(parse_targets(r#"{"status":"error","error":"boom"}"#, "j", "node").is_err());
        assert!(parse_targets("nope", "j", "node").is_err());
    }

    #[test]
    fn hosts_of_instances() {
        assert_eq!(host_of("127.0.0.1:9949"), "127.0.0.1");
        assert_eq!(host_of("[::1]:9949"), "::1");
        assert_eq!(host_of("node-1"), "node-1");
        assert_eq!(host_of("::1"), "::1");
    }

    #[test]
    fn node_names_from_inventory_then_labels_then_dns_never_ip() {
        let names = NodeNames::fixed([("127.0.0.1:18949", "gpu-node-17")]);
        let none = std::collections::BTreeMap::new();
        assert_eq!(
            names.name_of(Some("127.0.0.1:18949"), &none).as_deref(),
            Some("gpu-node-17")
        );
        let labelled =
            std::collections::BTreeMap::from([("nodename".to_string(), "gpu-node-3".to_string())]);
        assert_eq!(
            names.name_of(Some("10.0.0.3:9949"), &labelled).as_deref(),
            Some("gpu-node-3")
        );
        assert_eq!(
            names
                .name_of_instance("gpu-node-4.example.com:9949")
                .as_deref(),
            Some("gpu-node-4")
        );
        assert_eq!(names.name_of_instance("10.0.0.9:9949"), None);
        assert_eq!(names.name_of(None, &none), None);
        assert_eq!(names.instances_of("gpu-node-17"), vec!["127.0.0.1:18949"]);
        assert_eq!(names.known_nodes(), vec!["gpu-node-17"]);
    }

    #[tokio::test]
    async fn names_come_from_static_nodes() {
        let inv = Inventory::fixed(vec![AgentAddr {
            instance: "127.0.0.1:9949".into(),
            node: "node-a".into(),
            url: "http://127.0.0.1:9949".into(),
        }]);
        let names = inv.names().await;
        assert_eq!(
            names.name_of_instance("127.0.0.1:9949").as_deref(),
            Some("node-a")
        );
    }

    #[tokio::test]
    async fn unknown_instance_is_refused_with_a_reason() {
        let inv = Inventory::fixed(vec![AgentAddr {
            instance: "127.0.0.1:9949".into(),
            node: "node-a".into(),
            url: "http://127.0.0.1:9949".into(),
        }]);
        assert_eq!(inv.lookup("127.0.0.1:9949").await.unwrap().node, "node-a");
        let e = inv.lookup("127.0.0.1:4444").await.unwrap_err();
        assert!(e.contains("not a known agent"), "{e}");
    }

    #[tokio::test]
    async fn a_silent_agent_delays_an_alert_once_by_the_deadline_then_is_cached() {
        // Accepts connections (the kernel's backlog) and never answers.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = silent.local_addr().unwrap().to_string();
        let inv = Inventory::fixed(vec![AgentAddr {
            instance: addr.clone(),
            node: "node-a".into(),
            url: format!("http://{addr}"),
        }]);
        let id = Identity::new(Some(inv), EventsClient::from_config(&BotConfig::default()));
        let asked = vec![addr.clone(), "10.9.9.9:9949".to_string()];
        let t = Instant::now();
        let got = id.oom_kills(&asked).await;
        let first = t.elapsed();
        assert!(
            first < VICTIMS_DEADLINE + Duration::from_millis(500),
            "{first:?}"
        );
        let why = got[&addr].clone().unwrap_err();
        assert!(why.contains("did not answer within 2 s"), "{why}");
        // Not in the inventory: never asked.
        assert!(!got.contains_key("10.9.9.9:9949"));
        let t = Instant::now();
        let again = id.oom_kills(&asked).await;
        assert!(t.elapsed() < Duration::from_millis(50), "{:?}", t.elapsed());
        assert_eq!(again[&addr], got[&addr]);
        drop(silent);
    }

    #[test]
    fn oom_kills_of_events_oldest_first() {
        let events: Vec<serde_json::Value> = serde_json::from_str(
            r#"[{"timestamp":20,"type":"oom_kill","pid":7,"process":"b","cgroup":"/"},
                {"timestamp":10,"type":"oom_kill","pid":6,"process":"a","cgroup":"/slurm/job_1"},
                {"timestamp":15,"type":"io_error","device":"nvme0n1"},
                {"timestamp":"x","type":"oom_kill"}]"#,
        )
        .unwrap();
        let k = oom_kills(&events);
        assert_eq!(k.len(), 2);
        assert_eq!(k[0].process.as_deref(), Some("a"));
        assert_eq!(k[0].cgroup.as_deref(), Some("/slurm/job_1"));
        assert_eq!(k[1].cgroup, None);
    }

    #[tokio::test]
    async fn identity_names_read_the_discovered_targets() {
        let app =
            axum::Router::new().route("/api/v1/targets", axum::routing::get(|| async { TARGETS }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let cfg = BotConfig::from_str(
            std::path::Path::new("b.toml"),
            &format!(
                "[prometheus]\nurl = \"http://{addr}\"\n[agents]\nprometheus_job = \"gpuops\"\n"
            ),
        )
        .unwrap();
        let names = Identity::from_config(&cfg).names().await;
        assert_eq!(
            names.name_of_instance("10.0.0.18:9949").as_deref(),
            Some("gpu-node-18")
        );
        assert_eq!(names.instances_of("gpu-node-18"), vec!["10.0.0.18:9949"]);
    }

    /// Issue 22, observation 8: `prometheus_job = "gpuops"` against the
    /// shipped job `gpuops-agent` refused every run and nothing warned.
    #[tokio::test]
    async fn prometheus_job_without_targets_warns_naming_the_jobs_prometheus_has() {
        let app =
            axum::Router::new().route("/api/v1/targets", axum::routing::get(|| async { TARGETS }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let cfg = |job: &str| {
            BotConfig::from_str(
                std::path::Path::new("b.toml"),
                &format!(
                    "[prometheus]\nurl = \"http://{addr}\"\n[agents]\nprometheus_job = \"{job}\"\n"
                ),
            )
            .unwrap()
        };
        assert_eq!(job_warning(&cfg("gpuops")).await, None);
        let w = job_warning(&cfg("gpuops-agent")).await.unwrap();
        assert!(
            w.contains("Prometheus job \"gpuops-agent\" ([agents] prometheus_job) has no targets"),
            "{w}"
        );
        assert!(w.ends_with("the jobs Prometheus has: gpuops, node"), "{w}");
        let down = BotConfig::from_str(
            std::path::Path::new("b.toml"),
            "[prometheus]\nurl = \"http://127.0.0.1:9\"\n[agents]\nprometheus_job = \"gpuops-agent\"\n",
        )
        .unwrap();
        let w = job_warning(&down).await.unwrap();
        assert!(
            w.starts_with("cannot check that Prometheus job \"gpuops-agent\""),
            "{w}"
        );
        // No job configured: nothing to check.
        let none = BotConfig::from_str(std::path::Path::new("b.toml"), "").unwrap();
        assert_eq!(job_warning(&none).await, None);
    }
}
