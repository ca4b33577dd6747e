//! OOM victims for the "Host" section: the kills an agent's `GET
//! /v1/events` still holds, asked of each node that had OOM kills in the
//! period. The real source ([`AgentEvents`]) finds the agent in the bot's
//! inventory (`[agents]`) and reaches it through the same HTTP client the
//! runbook engine uses for `/v1/exec` (`[agents]` TLS trust, client
//! certificate, basic auth). Each node is asked with a deadline of
//! [`FETCH_DEADLINE`], at most [`CONCURRENCY`] at once; a node that cannot
//! be asked gets a reason instead of victims, never a failed report.

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::future::{join_all, BoxFuture};

use crate::config::BotConfig;
use crate::inventory::{EventsClient, Inventory};

/// Deadline of one node's answer (inventory look-up included).
pub const FETCH_DEADLINE: Duration = Duration::from_secs(5);
/// Nodes asked at once.
pub const CONCURRENCY: usize = 16;
/// Nodes asked per report (the rest say so): bounds the report's time.
pub const MAX_NODES: usize = 64;

/// One process the OOM killer killed, as the agent recorded it (the
/// inventory's reading of `/v1/events`, shared with the alert lines).
pub use crate::inventory::OomKill as OomVictim;

/// Where a report finds OOM victims (the agents; tests inject their own).
pub trait OomEvents: Send + Sync {
    /// The OOM kills the agent behind `instance` (the Prometheus `instance`
    /// label) holds at or after `since` (Unix seconds), or why they are
    /// unknown (a short phrase: "not in the agent inventory", "agent
    /// unreachable: …").
    fn oom_kills<'a>(
        &'a self,
        instance: &'a str,
        since: f64,
    ) -> BoxFuture<'a, Result<Vec<OomVictim>, String>>;
}

/// The victims of each node within `[from, to]` (Unix seconds), or why they
/// are unknown; each node asked once, within [`FETCH_DEADLINE`], at most
/// [`CONCURRENCY`] at once, at most [`MAX_NODES`] nodes.
pub async fn fetch_all(
    source: &dyn OomEvents,
    nodes: &[String],
    from: f64,
    to: f64,
) -> BTreeMap<String, Result<Vec<OomVictim>, String>> {
    fetch_within(source, nodes, from, to, FETCH_DEADLINE).await
}

async fn fetch_within(
    source: &dyn OomEvents,
    nodes: &[String],
    from: f64,
    to: f64,
    deadline: Duration,
) -> BTreeMap<String, Result<Vec<OomVictim>, String>> {
    let permits = tokio::sync::Semaphore::new(CONCURRENCY);
    let mut asks = Vec::new();
    for node in nodes.iter().take(MAX_NODES) {
        let permits = &permits;
        asks.push(async move {
            let _permit = permits.acquire().await.ok();
            let got = match tokio::time::timeout(deadline, source.oom_kills(node, from)).await {
                Ok(Ok(mut v)) => {
                    v.retain(|k| k.timestamp >= from && k.timestamp <= to);
                    v.sort_by(|a, b| a.timestamp.total_cmp(&b.timestamp));
                    Ok(v)
                }
                Ok(Err(why)) => Err(why),
                Err(_) => Err(format!(
                    "agent did not answer within {} s",
                    deadline.as_secs_f64()
                )),
            };
            (node.clone(), got)
        });
    }
    let mut out: BTreeMap<String, Result<Vec<OomVictim>, String>> =
        join_all(asks).await.into_iter().collect();
    for node in nodes.iter().skip(MAX_NODES) {
        out.insert(
            node.clone(),
            Err(format!(
                "not asked (a report asks the agents of at most {MAX_NODES} nodes)"
            )),
        );
    }
    out
}

/// The agents of `[agents]`, asked for `GET /v1/events`.
pub struct AgentEvents {
    inventory: Inventory,
    client: EventsClient,
}

impl AgentEvents {
    /// From the bot configuration; `None` without an `[agents]` section.
    pub fn from_config(cfg: &BotConfig) -> Option<AgentEvents> {
        Some(AgentEvents {
            inventory: Inventory::from_config(cfg)?,
            client: EventsClient::from_config(cfg),
        })
    }

    async fn fetch(&self, instance: &str, since: f64) -> Result<Vec<OomVictim>, String> {
        let agent = self
            .inventory
            .lookup(instance)
            .await
            .map_err(|_| "not in the agent inventory".to_string())?;
        Ok(oom_victims(self.client.events(&agent.url, since).await?))
    }
}

impl OomEvents for AgentEvents {
    fn oom_kills<'a>(
        &'a self,
        instance: &'a str,
        since: f64,
    ) -> BoxFuture<'a, Result<Vec<OomVictim>, String>> {
        Box::pin(self.fetch(instance, since))
    }
}

/// The OOM kills among a `/v1/events` answer's events, oldest first (other
/// kinds and unreadable entries are skipped): [`crate::inventory::oom_kills`].
pub fn oom_victims(events: Vec<serde_json::Value>) -> Vec<OomVictim> {
    crate::inventory::oom_kills(&events)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oom_kills_of_an_events_answer() {
        let body = br#"{"since":1,"events":[
          {"timestamp":10.5,"counted":true,"type":"oom_kill","pid":77,"process":"trainer","cgroup":"/system.slice/train.service","message":"m"},
          {"timestamp":11,"counted":true,"type":"io_error","device":"nvme1n1","message":"m"},
          {"timestamp":12,"counted":false,"type":"oom_kill","pid":null,"process":null,"cgroup":"/","message":"m"},
          {"timestamp":"bad","type":"oom_kill"}
        ]}"#;
        let v = oom_victims(crate::inventory::events_of(body).unwrap());
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].pid, Some(77));
        assert_eq!(v[0].process.as_deref(), Some("trainer"));
        assert_eq!(v[0].cgroup.as_deref(), Some("/system.slice/train.service"));
        assert_eq!((v[1].pid, v[1].cgroup.as_deref()), (None, None));
        assert!(crate::inventory::events_of(b"nope").is_err());
    }

    struct Slow;
    impl OomEvents for Slow {
        fn oom_kills<'a>(
            &'a self,
            instance: &'a str,
            _since: f64,
        ) -> BoxFuture<'a, Result<Vec<OomVictim>, String>> {
            Box::pin(async move {
                if instance == "slow" {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                }
                Ok(vec![
                    OomVictim {
                        timestamp: 5.0,
                        pid: Some(1),
                        process: None,
                        cgroup: None,
                    },
                    OomVictim {
                        timestamp: 50.0,
                        pid: Some(2),
                        process: None,
                        cgroup: None,
                    },
                ])
            })
        }
    }

    #[tokio::test]
    async fn a_slow_agent_gets_the_deadline_and_kills_outside_the_period_are_dropped() {
        let nodes = vec!["fast".to_string(), "slow".to_string()];
        let got = fetch_within(&Slow, &nodes, 10.0, 100.0, Duration::from_millis(200)).await;
        let fast = got["fast"].as_ref().unwrap();
        assert_eq!(fast.len(), 1);
        assert_eq!(fast[0].pid, Some(2));
        assert!(got["slow"].as_ref().unwrap_err().contains("within 0.2 s"));
    }
}
