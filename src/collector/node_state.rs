//! Whether the scheduler has this node out: Slurm's view of the node
//! (`scontrol show node <node> --oneliner`), exported as
//! `gpuops_node_scheduler_state{scheduler="slurm",state}` (1 for the states
//! it is in, 0 for the others), so the bot and alert rules can see a node
//! drained by hand or by another tool. Off by default (`[node_state] slurm`).
//!
//! This collector never runs `scontrol` itself (collectors spawn nothing):
//! the agent's wiring (`agent.rs`) samples it through the runbook
//! executor's runner on its own cadence ([`SAMPLE_EVERY`], with a
//! deadline) and stores each reading in [`Latest`]; a scrape reads only
//! that. No reading yet, a failed one, or one older than [`STALE_AFTER`]
//! fails the collector (`gpuops_collector_success{collector="node_state"}`
//! 0) and exports no state: never a guess. Slurm's drain reason is
//! exported as `gpuops_node_scheduler_info{scheduler="slurm",reason,since}`
//! 1 (outside text: a label value only, escaped by the exposition encoder,
//! cut to [`MAX_REASON_CHARS`]); the bot reads both (`src/found.rs`).
//! Kubernetes' cordon state is not read here (the agent holds no cluster
//! credentials): the bot reads kube-state-metrics from Prometheus.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::collector::{Collector, Context, Error, Sink};

/// How often the agent runs `scontrol show node`.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(60);

/// The deadline of one `scontrol` run.
pub const SAMPLE_TIMEOUT: Duration = Duration::from_secs(10);

/// A reading older than this is not exported.
pub const STALE_AFTER: Duration = Duration::from_secs(3 * 60);

/// The states exported, each 0 or 1.
pub const STATES: [&str; 7] = [
    "drain",
    "drained",
    "draining",
    "down",
    "idle",
    "allocated",
    "mixed",
];

/// The longest drain reason exported (a label value: cut with `…`).
pub const MAX_REASON_CHARS: usize = 200;

/// Slurm's state of this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlurmNode {
    /// `State=` as printed (`IDLE+DRAIN`).
    pub raw: String,
    /// Of [`STATES`], those the node is in.
    pub states: Vec<&'static str>,
    /// `Reason=` (why it was drained or set down), if any.
    pub reason: Option<String>,
}

impl SlurmNode {
    /// The drain reason as exported: `Reason=` without Slurm's trailing
    /// `[user@time]`, every control character a space, at most
    /// [`MAX_REASON_CHARS`]; and the time from that suffix (as Slurm
    /// prints it, the controller's local time), or empty.
    pub fn reason_and_since(&self) -> Option<(String, String)> {
        let raw = self.reason.as_deref()?;
        let (text, since) = match raw
            .trim_end()
            .strip_suffix(']')
            .and_then(|r| r.rsplit_once('['))
        {
            Some((text, who_when)) => match who_when.rsplit_once('@') {
                Some((_, when)) if when.len() <= 40 => (text.trim_end(), when.to_string()),
                _ => (raw, String::new()),
            },
            None => (raw, String::new()),
        };
        let mut out: String = text
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        if out.chars().count() > MAX_REASON_CHARS {
            out = out.chars().take(MAX_REASON_CHARS - 1).collect();
            out.push('…');
        }
        let since = since
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | ':' | 'T' | '.' | '+'))
            .collect();
        Some((out, since))
    }
}

/// Parses one node of `scontrol show node <node> --oneliner`.
pub fn parse_scontrol(text: &str) -> Result<SlurmNode, String> {
    let line = text
        .lines()
        .find(|l| l.contains("NodeName="))
        .ok_or_else(|| format!("no NodeName= in scontrol's output: {:?}", first_line(text)))?;
    let raw = field(line, "State")
        .ok_or_else(|| "no State= in scontrol's output".to_string())?
        .to_string();
    let mut parts = raw.split('+');
    // `IDLE*` (not responding), `DOWN~` (powered off), …: the base state
    // without its marker.
    let base = parts
        .next()
        .unwrap_or_default()
        .trim_end_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_ascii_lowercase();
    let flags: Vec<String> = parts.map(|f| f.to_ascii_lowercase()).collect();
    let drain = base == "drain" || base == "drained" || flags.iter().any(|f| f == "drain");
    let mut states = Vec::new();
    for s in ["idle", "allocated", "mixed", "down"] {
        if base == s || (s == "down" && flags.iter().any(|f| f == "down")) {
            states.push(s);
        }
    }
    if drain {
        states.push("drain");
        if matches!(base.as_str(), "allocated" | "mixed" | "completing") {
            states.push("draining");
        } else {
            states.push("drained");
        }
    }
    states.sort_by_key(|s| STATES.iter().position(|x| x == s));
    // `Reason=` runs to the end of the line (it may hold spaces).
    let reason = line
        .find(" Reason=")
        .map(|i| line[i + " Reason=".len()..].trim().to_string())
        .filter(|r| !r.is_empty() && r != "(null)");
    Ok(SlurmNode {
        raw,
        states,
        reason,
    })
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

fn first_line(text: &str) -> &str {
    let l = text.lines().next().unwrap_or_default();
    l.get(..l.len().min(200)).unwrap_or(l)
}

/// The latest Slurm reading, written by the agent's sampler.
#[derive(Debug, Default)]
pub struct Latest {
    inner: Mutex<Option<(Instant, Result<SlurmNode, String>)>>,
}

impl Latest {
    pub fn set(&self, reading: Result<SlurmNode, String>) {
        *self.inner.lock().unwrap_or_else(PoisonError::into_inner) =
            Some((Instant::now(), reading));
    }

    fn get(&self) -> Option<(Instant, Result<SlurmNode, String>)> {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Exports the latest reading of [`Latest`].
pub struct NodeStateCollector {
    latest: Arc<Latest>,
}

impl NodeStateCollector {
    pub fn new(ctx: &Arc<Context>) -> NodeStateCollector {
        NodeStateCollector {
            latest: ctx.scheduler.clone(),
        }
    }
}

impl Collector for NodeStateCollector {
    fn name(&self) -> &'static str {
        "node_state"
    }

    fn collect(&self, _ctx: &Context, sink: &mut Sink) -> Result<(), Error> {
        let (at, reading) = self
            .latest
            .get()
            .ok_or_else(|| Error::Unavailable("no scontrol reading yet".into()))?;
        if at.elapsed() > STALE_AFTER {
            return Err(Error::Unavailable(format!(
                "the last scontrol reading is {}s old",
                at.elapsed().as_secs()
            )));
        }
        let node = reading.map_err(Error::Unavailable)?;
        for s in STATES {
            sink.gauge(
                "gpuops_node_scheduler_state",
                "Whether the scheduler has this node in the state (1) or not (0): Slurm's State= of `scontrol show node <node> --oneliner` (drain: the DRAIN flag; drained: drain and idle or down; draining: drain with jobs still running), sampled every 60 s.",
                &[("scheduler", "slurm"), ("state", s)],
                if node.states.contains(&s) { 1.0 } else { 0.0 },
            );
        }
        if let Some((reason, since)) = node.reason_and_since() {
            sink.gauge(
                "gpuops_node_scheduler_info",
                "Why the scheduler has this node out (1 while a reason is set): Slurm's Reason= of `scontrol show node <node> --oneliner` without its [user@time] suffix (reason, at most 200 characters) and that suffix's time (since, the controller's local time as printed).",
                &[("scheduler", "slurm"), ("reason", &reason), ("since", &since)],
                1.0,
            );
        }
        Ok(())
    }

    fn may_block(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(line: &str, states: &[&str], reason: Option<&str>) {
        let n = parse_scontrol(line).unwrap();
        assert_eq!(n.states, states, "{line}");
        assert_eq!(n.reason.as_deref(), reason, "{line}");
    }

    #[test]
    fn scontrol_states_parse_into_drain_drained_draining() {
        check(
            "NodeName=gpu-node-17 Arch=x86_64 CoresPerSocket=32 CPUAlloc=0 State=IDLE+DRAIN ThreadsPerCore=2 Partitions=gpu Reason=XID 79 on GPU 3 [root@2026-12-03T10:00:00]",
            &["drain", "drained", "idle"],
            Some("XID 79 on GPU 3 [root@2026-12-03T10:00:00]"),
        );
        check(
            "NodeName=gpu-node-17 State=MIXED+DRAIN Reason=maintenance [alice@2026-12-03T10:00:00]",
            &["drain", "draining", "mixed"],
            Some("maintenance [alice@2026-12-03T10:00:00]"),
        );
        check(
            "NodeName=gpu-node-17 State=ALLOCATED Partitions=gpu",
            &["allocated"],
            None,
        );
        check(
            "NodeName=gpu-node-17 State=DOWN*+DRAIN Reason=Not responding [slurm@2026-12-03T10:00:00]",
            &["drain", "drained", "down"],
            Some("Not responding [slurm@2026-12-03T10:00:00]"),
        );
        check(
            "NodeName=gpu-node-17 State=IDLE Reason=(null)",
            &["idle"],
            None,
        );
        assert!(parse_scontrol("Node gpu-node-99 not found").is_err());
    }

    #[test]
    fn slurm_drain_reason_is_split_from_its_user_and_time_and_bounded() {
        let n = parse_scontrol(
            "NodeName=gpu-node-17 State=IDLE+DRAIN Reason=XID 79 on GPU 3 [root@2026-12-03T10:00:00]",
        )
        .unwrap();
        assert_eq!(
            n.reason_and_since(),
            Some(("XID 79 on GPU 3".into(), "2026-12-03T10:00:00".into()))
        );
        let long = format!("NodeName=n State=DRAIN Reason={}\u{7}\"x", "a".repeat(500));
        let (r, since) = parse_scontrol(&long).unwrap().reason_and_since().unwrap();
        assert_eq!(r.chars().count(), MAX_REASON_CHARS);
        assert!(r.ends_with('…'), "{r}");
        assert_eq!(since, "");
        let n = parse_scontrol("NodeName=n State=IDLE Reason=(null)").unwrap();
        assert_eq!(n.reason_and_since(), None);
        assert!(parse_scontrol("NodeName=gpu-node-17 Arch=x86_64").is_err());
    }
}
