//! The kubelet pod-resources mapping's health: `gpuops_collector_success
//! {collector="pod_resources"}` says whether the last `List` call answered,
//! `gpuops_pod_resources_age_seconds` how old the mapping is and
//! `gpuops_pod_resources_allocations` how many GPU allocations are served.
//! Registered only when `[kubernetes]` is on (`crate::kubelet::active`).
//!
//! This collector never calls the kubelet: the agent's background reader
//! (`crate::kubelet::spawn_refresher`) does, and a scrape reads only
//! [`crate::kubelet::Latest`]. The series naming pods (`gpu_pod_info`, the
//! `gpu_workload_*` labels) are the GPU collector's.

use crate::collector::{Collector, Context, Error, Sink};

pub struct PodResourcesCollector;

impl Collector for PodResourcesCollector {
    fn name(&self) -> &'static str {
        "pod_resources"
    }

    fn collect(&self, ctx: &Context, sink: &mut Sink) -> Result<(), Error> {
        let status = ctx.pod_resources.status();
        if let Some(age) = status.age {
            sink.gauge(
                "gpuops_pod_resources_age_seconds",
                "Seconds since the kubelet's pod-resources API (v1 PodResourcesLister/List on [kubernetes] pod_resources_socket) last answered; read in the background every [kubernetes] refresh_interval_secs. A mapping older than six intervals is dropped: gpu_pod_info disappears and gpu_workload_* keep the pod uid only.",
                &[],
                age.as_secs_f64(),
            );
        }
        sink.gauge(
            "gpuops_pod_resources_allocations",
            "GPU devices allocated to containers in the pod-resources mapping served (resources nvidia.com/gpu, nvidia.com/mig-* and [kubernetes] resource_names); 0 when none is served.",
            &[],
            status.allocations as f64,
        );
        match status.error {
            Some(e) => Err(Error::Unavailable(format!("kubelet pod-resources: {e}"))),
            None => Ok(()),
        }
    }

    fn may_block(&self) -> bool {
        false
    }
}
