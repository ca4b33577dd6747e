//! Every PromQL expression a report runs, in one table: a reader who wants
//! to know where a number comes from finds it here in one hop (and the
//! report links each number to its expression in Prometheus's graph page).
//!
//! Placeholders, replaced by [`Query::render`]: `$RANGE` is the report's
//! period (`86400s`), `$RANGE_OPEN` the period less one second (so a
//! subquery's hourly steps are the period's whole hours on Prometheus 2 and 3
//! alike), `$SECS` the period in seconds; `$NODES` (only in
//! [`NODES_LAST_SEEN`]) is filled in by the report with the nodes found by
//! [`NODES_STOPPED`], so the expensive per-minute look-back runs for those
//! alone. Nodes are told apart by the
//! `instance` label (the agent's scrape target), GPUs by `gpu`.
//!
//! Counters are read as "last value in the period minus the value at its
//! start (0 for a series that appeared within it)", never `increase()`: a
//! counter such as `gpu_xid_errors_total{xid}` appears with its first event,
//! which `increase()` would not count, and XID counts must be exact.

/// One named query.
#[derive(Debug, Clone, Copy)]
pub struct Query {
    pub id: &'static str,
    /// What the number means.
    pub what: &'static str,
    pub promql: &'static str,
}

impl Query {
    /// The expression for a period of `secs` seconds.
    pub fn render(&self, secs: u64) -> String {
        self.promql
            .replace("$RANGE_OPEN", &format!("{}s", secs.saturating_sub(1)))
            .replace("$RANGE", &format!("{secs}s"))
            .replace("$SECS", &secs.to_string())
    }
}

macro_rules! query {
    ($name:ident, $what:expr, $promql:expr) => {
        pub const $name: Query = Query {
            id: stringify!($name),
            what: $what,
            promql: $promql,
        };
    };
}

// Fleet.
query!(
    NODES_NOW,
    "agents reporting at the period's end",
    r#"count(group by (instance) (gpuops_build_info{role="agent"}))"#
);
query!(
    NODES_SEEN,
    "agents that reported at any time in the period",
    r#"count(group by (instance) (max_over_time(gpuops_build_info{role="agent"}[$RANGE])))"#
);
query!(
    NODES_STOPPED,
    "agents that reported in the period but not at its end",
    r#"group by (instance) (max_over_time(gpuops_build_info{role="agent"}[$RANGE])) unless on (instance) gpuops_build_info{role="agent"}"#
);
query!(
    NODES_LAST_SEEN,
    "when the agents that stopped were last seen (Unix time; run only for those, `$NODES` is their regex)",
    r#"max by (instance) (max_over_time(timestamp(gpuops_build_info{role="agent",instance=~"$NODES"})[$RANGE:1m]))"#
);
query!(
    GPUS_DROPPED,
    "GPUs fewer than the most a node had in the period",
    r#"max_over_time(gpu_devices[$RANGE]) - gpu_devices > 0"#
);
query!(
    GPUS_MOST,
    "the most GPUs a node had in the period, for nodes with fewer now",
    r#"max_over_time(gpu_devices[$RANGE]) and on (instance) (max_over_time(gpu_devices[$RANGE]) - gpu_devices > 0)"#
);
query!(
    GPUS_MISSING,
    "GPUs that reported in the period but not at its end, on nodes still reporting",
    r#"(group by (instance, gpu, uuid) (max_over_time(gpu_utilization_percent[$RANGE])) unless on (instance, gpu) gpu_utilization_percent) and on (instance) gpuops_build_info{role="agent"}"#
);
query!(
    GPUS_DOWN,
    "GPUs the agent sees but cannot read (lost, fell off the bus)",
    r#"gpu_up == 0"#
);
query!(
    COLLECTOR_FAILURES,
    "agent collectors that failed in the period (value: fraction of scrapes that succeeded)",
    r#"avg_over_time(gpuops_collector_success[$RANGE]) < 1"#
);

// GPU health.
query!(
    XIDS,
    "XID errors in the period, by node, GPU and code",
    r#"sum by (instance, gpu, uuid, pci_bus_id, xid) (clamp_min(last_over_time(gpu_xid_errors_total[$RANGE]) - (gpu_xid_errors_total offset $RANGE or last_over_time(gpu_xid_errors_total[$RANGE]) * 0), 0)) > 0"#
);
query!(
    ECC_UNCORRECTED,
    "uncorrectable ECC errors in the period, by node and GPU",
    r#"sum by (instance, gpu, uuid) (clamp_min(last_over_time(gpu_ecc_errors_total{type="uncorrected",scope="aggregate"}[$RANGE]) - (gpu_ecc_errors_total{type="uncorrected",scope="aggregate"} offset $RANGE or last_over_time(gpu_ecc_errors_total{type="uncorrected",scope="aggregate"}[$RANGE]) * 0), 0)) > 0"#
);
query!(
    REMAP_PENDING,
    "GPUs with a row remap pending at the period's end (needs a GPU reset)",
    r#"max by (instance, gpu, uuid) (last_over_time(gpu_remapped_rows{state="pending"}[$RANGE])) > 0"#
);
query!(
    REMAP_FAILED,
    "GPUs whose row remapping failed (no spare rows)",
    r#"max by (instance, gpu, uuid) (last_over_time(gpu_remapped_rows{state="failure"}[$RANGE])) > 0"#
);
query!(
    NVLINK_ERRORS,
    "NVLink errors (CRC, replay, recovery) in the period, by node and GPU",
    r#"sum by (instance, gpu, uuid) (clamp_min(last_over_time(gpu_nvlink_errors_total[$RANGE]) - (gpu_nvlink_errors_total offset $RANGE or last_over_time(gpu_nvlink_errors_total[$RANGE]) * 0), 0)) > 0"#
);
query!(
    PCIE_REPLAYS,
    "PCIe replays in the period, by node and GPU",
    r#"sum by (instance, gpu, uuid) (clamp_min(last_over_time(gpu_pcie_replay_total[$RANGE]) - (gpu_pcie_replay_total offset $RANGE or last_over_time(gpu_pcie_replay_total[$RANGE]) * 0), 0)) > 0"#
);
query!(
    THROTTLE_SECONDS,
    "seconds of the period a GPU was held down for thermal or power reasons",
    r#"sum by (instance, gpu, uuid, reason) (avg_over_time(gpu_throttle_reason{reason=~"hw_thermal_slowdown|sw_thermal_slowdown|hw_power_brake_slowdown|hw_slowdown|sw_power_cap"}[$RANGE])) * $SECS > 0"#
);

// Utilization and waste.
query!(
    FLEET_UTILIZATION,
    "fleet GPU utilization averaged over the period (percent)",
    r#"avg(avg_over_time(gpu_utilization_percent[$RANGE]))"#
);
query!(
    FLEET_UTILIZATION_SERIES,
    "fleet GPU utilization over time (percent; the chart)",
    r#"avg(gpu_utilization_percent)"#
);
query!(
    NODE_UTILIZATION,
    "GPU utilization averaged over the period, by node (percent)",
    r#"avg by (instance) (avg_over_time(gpu_utilization_percent[$RANGE]))"#
);
query!(
    IDLE_GPU_HOURS,
    "GPU-hours idle: whole clock hours (UTC) in which a GPU stayed under 5 % utilization, by node",
    r#"sum by (instance) (sum_over_time((max_over_time(gpu_utilization_percent[3599s]) < bool 5)[$RANGE_OPEN:1h]))"#
);
query!(
    GPU_MEMORY_USED,
    "GPU memory used, averaged over the period (fraction of the fleet's GPU memory)",
    r#"sum(avg_over_time(gpu_memory_used_bytes[$RANGE])) / sum(avg_over_time(gpu_memory_total_bytes[$RANGE]))"#
);
query!(
    WORKLOADS_TOP,
    "workloads holding the most GPU memory, averaged over the period (bytes), top 5; Kubernetes pods by namespace and pod where the agent names them",
    r#"topk(5, sum by (instance, workload_type, workload, namespace, pod, exported_namespace, exported_pod, endpoint) (avg_over_time(gpu_workload_memory_used_bytes[$RANGE])) > 0)"#
);

// Host.
query!(
    OOM_KILLS,
    "OOM kills in the period, by node",
    r#"sum by (instance) (clamp_min(last_over_time(oom_kills_total[$RANGE]) - (oom_kills_total offset $RANGE or last_over_time(oom_kills_total[$RANGE]) * 0), 0)) > 0"#
);
query!(
    FILESYSTEMS_FULL,
    "filesystems above 80 % used at the period's end (fraction used)",
    r#"storage_used_bytes / storage_total_bytes > 0.8"#
);
query!(
    FILESYSTEMS_TIME_TO_FULL,
    "seconds until a filesystem above 80 % is full at the period's trend (free bytes / deriv of used bytes)",
    r#"((storage_total_bytes - storage_used_bytes) / deriv(storage_used_bytes[$RANGE])) and on (instance, mountpoint) (storage_used_bytes / storage_total_bytes > 0.8)"#
);
query!(
    MOUNTS_READONLY,
    "mounts read-only at the period's end that were writable during it",
    r#"(storage_readonly == 1) and on (instance, mountpoint) (min_over_time(storage_readonly[$RANGE]) == 0)"#
);
query!(
    MOUNTS_STUCK,
    "mounts whose statfs did not answer in time during the period",
    r#"max_over_time(storage_mount_stuck[$RANGE]) > 0"#
);
query!(
    MEMORY_PRESSURE,
    "percent of the period some task stalled on memory (PSI), top nodes above 1 %",
    r#"topk(10, 100 * rate(memory_pressure_stall_seconds_total{kind="some"}[$RANGE]) > 1)"#
);
query!(
    IO_PRESSURE,
    "percent of the period some task stalled on I/O (PSI), top nodes above 1 %",
    r#"topk(10, 100 * rate(storage_io_pressure_stall_seconds_total{kind="some"}[$RANGE]) > 1)"#
);

/// Every query above, in report order (the table in docs/ops.md).
pub const ALL: &[Query] = &[
    NODES_NOW,
    NODES_SEEN,
    NODES_STOPPED,
    NODES_LAST_SEEN,
    GPUS_DROPPED,
    GPUS_MOST,
    GPUS_MISSING,
    GPUS_DOWN,
    COLLECTOR_FAILURES,
    XIDS,
    ECC_UNCORRECTED,
    REMAP_PENDING,
    REMAP_FAILED,
    NVLINK_ERRORS,
    PCIE_REPLAYS,
    THROTTLE_SECONDS,
    FLEET_UTILIZATION,
    FLEET_UTILIZATION_SERIES,
    NODE_UTILIZATION,
    IDLE_GPU_HOURS,
    GPU_MEMORY_USED,
    WORKLOADS_TOP,
    OOM_KILLS,
    FILESYSTEMS_FULL,
    FILESYSTEMS_TIME_TO_FULL,
    MOUNTS_READONLY,
    MOUNTS_STUCK,
    MEMORY_PRESSURE,
    IO_PRESSURE,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_become_the_period() {
        let q = IDLE_GPU_HOURS.render(86_400);
        assert!(q.contains("[86399s:1h]"), "{q}");
        assert!(!q.contains('$'));
        let t = THROTTLE_SECONDS.render(3600);
        assert!(t.contains("[3600s]") && t.ends_with("* 3600 > 0"), "{t}");
        for q in ALL {
            let r = q.render(604_800).replace("$NODES", "a");
            assert!(!r.contains('$'), "{}", q.id);
        }
    }
}
