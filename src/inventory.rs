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
        let node_label = match &self.discovery {
            Some(d) => {
                let cache = self.discovered.lock().await;
                for (instance, a) in &cache.agents {
                    by_instance
                        .entry(instance.clone())
                        .or_insert_with(|| a.node.clone());
                }
                d.node_label.clone()
            }
            None => "node".to_string(),
        };
        NodeNames {
            by_instance,
            node_label,
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
}

impl Default for NodeNames {
    fn default() -> NodeNames {
        NodeNames {
            by_instance: HashMap::new(),
            node_label: "node".to_string(),
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
        }
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
    parse_targets(&body, &d.job, &d.node_label)
}

/// The agents of `job` in a `/api/v1/targets` answer, and the targets
/// without a usable node name.
fn parse_targets(body: &str, job: &str, node_label: &str) -> Result<Parsed, String> {
    let r: TargetsResponse =
        serde_json::from_str(body).map_err(|e| format!("unreadable targets answer: {e}"))?;
    if r.status != "success" {
        return Err(format!(
            "Prometheus answered {}: {}",
            r.status,
            r.error.unwrap_or_default()
        ));
    }
    let mut agents = HashMap::new();
    let mut unnamed = HashMap::new();
    for t in r.data.map(|d| d.active).unwrap_or_default() {
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
}
