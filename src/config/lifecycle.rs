//! The bot's `[lifecycle]` section: how nodes out of service are tracked
//! (`src/lifecycle.rs`, `src/found.rs`).

use std::time::Duration;

use crate::config::{Reader, Section};

/// `[lifecycle]`: how nodes out of service are tracked (`src/lifecycle.rs`).
#[derive(Debug, Clone, PartialEq)]
pub struct LifecycleConfig {
    /// `gpus_per_node` (8): the GPUs a node holds, for GPU-hours lost.
    pub gpus_per_node: u32,
    /// `remind_after` ("12h"): a node quarantined this long with nothing
    /// done gets a reminder (then at most daily).
    pub remind_after: Duration,
    /// `repeat_window` ("7d"): the same fault within this long of a
    /// return is a repeat.
    pub repeat_window: Duration,
    /// `availability_objective` (0.98): GPU-hours in service over owned.
    pub availability_objective: f64,
    /// `found` (true): read from Prometheus which nodes Slurm has drained
    /// or down and Kubernetes has cordoned, and track them (`src/found.rs`;
    /// needs `[prometheus] url`).
    pub found: bool,
    /// `found_interval` ("5m"): how often the schedulers' view is read.
    pub found_interval: Duration,
    /// `found_hold` ("30m"): a node whose state changed this recently (a
    /// person, a runbook) is left alone by the schedulers' view.
    pub found_hold: Duration,
}

impl Default for LifecycleConfig {
    fn default() -> Self {
        LifecycleConfig {
            gpus_per_node: 8,
            remind_after: Duration::from_secs(12 * 3600),
            repeat_window: Duration::from_secs(7 * 86_400),
            availability_objective: 0.98,
            found: true,
            found_interval: Duration::from_secs(300),
            found_hold: Duration::from_secs(1800),
        }
    }
}

/// Reads `[lifecycle]` into `c` (errors go to `r`, naming file, line and key).
pub(crate) fn read_section<'i>(r: &mut Reader<'i>, s: &mut Section<'i>, c: &mut LifecycleConfig) {
    if let Some(v) = r.get_with(s, "gpus_per_node", |n: i64| match u32::try_from(n) {
        Ok(n) if (1..=1024).contains(&n) => Ok(n),
        _ => Err(format!("must be between 1 and 1024, got {n}")),
    }) {
        c.gpus_per_node = v;
    }
    let days = |v: String| crate::config::paging::duration(&v);
    if let Some(v) = r.get_with(s, "remind_after", days) {
        c.remind_after = v;
    }
    if let Some(v) = r.get_with(s, "repeat_window", days) {
        c.repeat_window = v;
    }
    if let Some(v) = r.get::<bool>(s, "found") {
        c.found = v;
    }
    if let Some(v) = r.get_with(s, "found_interval", days) {
        c.found_interval = v;
    }
    if let Some(v) = r.get_with(s, "found_hold", days) {
        c.found_hold = v;
    }
    if let Some(v) = r.get_with(s, "availability_objective", |x: f64| {
        if x > 0.0 && x < 1.0 {
            Ok(x)
        } else {
            Err(format!(
                "must be a fraction between 0 and 1, like 0.98, got {x}"
            ))
        }
    }) {
        c.availability_objective = v;
    }
}
