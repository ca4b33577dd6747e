//! Which pod holds which GPU: the kubelet's pod-resources API v1
//! (`/v1.PodResourcesLister/List` on `[kubernetes] pod_resources_socket`),
//! read in the background every `[kubernetes] refresh_interval_secs` and
//! kept in [`Latest`], which the scrape only reads.
//!
//! A call is bounded in time ([`CALL_DEADLINE`]) and size
//! ([`MAX_RESPONSE_BYTES`]); a failed call keeps the last good mapping for
//! [`Latest::keep_for`] (six refresh intervals), then drops it: a pod name
//! a minute old may name a pod that has left the GPU, and a wrong name is
//! worse than the pod uid the cgroup gives. Only the allocations of GPU
//! resources (`nvidia.com/gpu`, `nvidia.com/mig-*`, `[kubernetes]
//! resource_names`) are kept. This module must not render metrics or read
//! GPUs (the GPU collector joins the allocations to its snapshot).

pub mod grpc;
pub mod proto;

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::config::agent::{KubernetesConfig, KubernetesEnabled};

/// The pod-resources API's method path.
pub const LIST_METHOD: &str = "/v1.PodResourcesLister/List";
/// The deadline of one `List` call (connect to last byte).
pub const CALL_DEADLINE: Duration = Duration::from_secs(5);
/// The largest answer accepted (the kubelet's own gRPC server allows 16 MiB).
pub const MAX_RESPONSE_BYTES: usize = 16 << 20;
/// A good mapping is served this many refresh intervals after it was read.
pub const KEEP_INTERVALS: u32 = 6;

/// One device of one container, as the kubelet allocated it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Allocation {
    pub namespace: String,
    pub pod: String,
    pub container: String,
    /// `nvidia.com/gpu`, `nvidia.com/mig-1g.10gb`, …
    pub resource: String,
    pub device: Device,
    /// `N` of a shared GPU's `<uuid>::N` (time-slicing, MPS).
    pub replica: Option<String>,
}

/// How the device plugin named the device.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Device {
    /// `GPU-…` or `MIG-…` (or any other id: matched against the GPUs'
    /// and MIG instances' UUIDs).
    Uuid(String),
    /// `nvidiaN`: the GPU of index N.
    Index(u32),
}

/// The GPU allocations of one `List` answer.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct PodMap {
    pub allocations: Vec<Allocation>,
}

/// Whether the pod-resources reader is on: `true`, or `auto` and the socket
/// exists now (checked once, at start).
pub fn active(cfg: &KubernetesConfig) -> bool {
    match cfg.enabled {
        KubernetesEnabled::On => true,
        KubernetesEnabled::Off => false,
        KubernetesEnabled::Auto => cfg.pod_resources_socket.exists(),
    }
}

/// Whether `resource` is a GPU resource the agent maps.
pub fn is_gpu_resource(resource: &str, extra: &[String]) -> bool {
    resource == "nvidia.com/gpu"
        || resource.starts_with("nvidia.com/mig-")
        || extra.iter().any(|r| r == resource)
}

/// A device id as the NVIDIA device plugin writes it: `GPU-<uuid>`,
/// `MIG-<uuid>`, either with `::N` (a replica of a shared GPU), or `nvidiaN`.
pub fn parse_device_id(id: &str) -> (Device, Option<String>) {
    let (base, replica) = match id.rsplit_once("::") {
        Some((b, n)) if !n.is_empty() && n.bytes().all(|c| c.is_ascii_digit()) => {
            (b, Some(n.to_string()))
        }
        _ => (id, None),
    };
    let device = match base
        .strip_prefix("nvidia")
        .and_then(|n| n.parse::<u32>().ok())
    {
        Some(i) => Device::Index(i),
        None => Device::Uuid(base.to_string()),
    };
    (device, replica)
}

/// The GPU allocations in a decoded `List` answer, sorted, each once; names
/// are outside text (control characters out, cut at 1,024 characters).
pub fn allocations(resp: &proto::ListPodResourcesResponse, extra: &[String]) -> PodMap {
    let mut out = Vec::new();
    for pod in &resp.pod_resources {
        for c in &pod.containers {
            for d in &c.devices {
                if !is_gpu_resource(&d.resource_name, extra) {
                    continue;
                }
                for id in &d.device_ids {
                    let (device, replica) = parse_device_id(id);
                    out.push(Allocation {
                        namespace: crate::escape::line(&pod.namespace),
                        pod: crate::escape::line(&pod.name),
                        container: crate::escape::line(&c.name),
                        resource: crate::escape::line(&d.resource_name),
                        device,
                        replica,
                    });
                }
            }
        }
    }
    out.sort();
    out.dedup();
    PodMap { allocations: out }
}

/// Decodes a `List` answer's message.
pub fn decode_list(message: &[u8], extra: &[String]) -> Result<PodMap, String> {
    use prost::Message as _;
    let resp = proto::ListPodResourcesResponse::decode(message)
        .map_err(|e| format!("cannot decode the kubelet's ListPodResourcesResponse: {e}"))?;
    Ok(allocations(&resp, extra))
}

/// One `List` call: the GPU allocations, or why not.
pub async fn list(cfg: &KubernetesConfig) -> Result<PodMap, String> {
    list_at(
        &cfg.pod_resources_socket,
        &cfg.resource_names,
        CALL_DEADLINE,
    )
    .await
}

/// [`list`] on `socket` with `deadline` (tests use a short one).
pub async fn list_at(
    socket: &Path,
    extra: &[String],
    deadline: Duration,
) -> Result<PodMap, String> {
    use prost::Message as _;
    let request = proto::ListPodResourcesRequest {}.encode_to_vec();
    let message =
        grpc::call_unary(socket, LIST_METHOD, &request, deadline, MAX_RESPONSE_BYTES).await?;
    let extra = extra.to_vec();
    // A large answer decodes in milliseconds: off the async workers.
    tokio::task::spawn_blocking(move || decode_list(&message, &extra))
        .await
        .map_err(|e| format!("decoding the answer failed: {e}"))?
}

/// The latest mapping, shared by the background reader (writes) and the
/// scrape (reads).
pub struct Latest {
    on: bool,
    keep_for: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    good: Option<(Instant, Arc<PodMap>)>,
    /// The last call's error; `None` after a good one.
    error: Option<String>,
    attempted: bool,
}

/// What the `pod_resources` collector exports.
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    /// Seconds since the last good answer (none yet: `None`).
    pub age: Option<Duration>,
    /// Whether the last call failed, and why; "no answer yet" before the first.
    pub error: Option<String>,
    /// GPU allocations in the mapping served (0 when dropped).
    pub allocations: usize,
}

impl Latest {
    /// `on`: whether a reader runs ([`active`]); `refresh`: its interval.
    pub fn new(on: bool, refresh: Duration) -> Latest {
        Latest {
            on,
            keep_for: refresh * KEEP_INTERVALS,
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn is_on(&self) -> bool {
        self.on
    }

    /// How long a good mapping is served after it was read.
    pub fn keep_for(&self) -> Duration {
        self.keep_for
    }

    /// Records one call's outcome (a failure logs when it starts and stops).
    pub fn store(&self, result: Result<PodMap, String>) {
        let mut s = self.lock();
        s.attempted = true;
        match result {
            Ok(map) => {
                if s.error.take().is_some() {
                    tracing::info!(
                        allocations = map.allocations.len(),
                        "kubelet pod-resources answers again"
                    );
                }
                s.good = Some((Instant::now(), Arc::new(map)));
            }
            Err(e) => {
                if s.error.as_deref() != Some(e.as_str()) {
                    tracing::warn!(error = %e, "kubelet pod-resources List failed, pod names kept for a while then dropped");
                }
                s.error = Some(e);
            }
        }
    }

    /// The mapping to serve: the last good one while it is younger than
    /// [`Latest::keep_for`].
    pub fn current(&self) -> Option<Arc<PodMap>> {
        if !self.on {
            return None;
        }
        let s = self.lock();
        let (at, map) = s.good.as_ref()?;
        (at.elapsed() <= self.keep_for).then(|| map.clone())
    }

    pub fn status(&self) -> Status {
        let s = self.lock();
        let age = s.good.as_ref().map(|(at, _)| at.elapsed());
        let allocations = s
            .good
            .as_ref()
            .filter(|(at, _)| at.elapsed() <= self.keep_for)
            .map_or(0, |(_, m)| m.allocations.len());
        let error = match (&s.error, s.attempted) {
            (Some(e), _) => Some(e.clone()),
            (None, false) => Some("no answer from the kubelet yet".to_string()),
            (None, true) => None,
        };
        Status {
            age,
            error,
            allocations,
        }
    }
}

/// The background reader: one `List` now, then every `refresh_interval`,
/// each with its deadline; never on the scrape path.
pub fn spawn_refresher(cfg: KubernetesConfig, latest: Arc<Latest>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(cfg.refresh_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            latest.store(list(&cfg).await);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    #[test]
    fn device_ids_in_every_form() {
        let uuid = |s: &str| Device::Uuid(s.to_string());
        assert_eq!(parse_device_id("GPU-6a1c"), (uuid("GPU-6a1c"), None));
        assert_eq!(
            parse_device_id("GPU-6a1c::3"),
            (uuid("GPU-6a1c"), Some("3".into()))
        );
        assert_eq!(parse_device_id("MIG-1a2b"), (uuid("MIG-1a2b"), None));
        assert_eq!(
            parse_device_id("MIG-1a2b::0"),
            (uuid("MIG-1a2b"), Some("0".into()))
        );
        assert_eq!(parse_device_id("nvidia7"), (Device::Index(7), None));
        assert_eq!(parse_device_id("nvidiactl"), (uuid("nvidiactl"), None));
        assert_eq!(parse_device_id("GPU-x::"), (uuid("GPU-x::"), None));
    }

    #[test]
    fn only_gpu_resources_are_kept_and_unknown_fields_are_skipped() {
        let resp = proto::ListPodResourcesResponse {
            pod_resources: vec![proto::PodResources {
                name: "llama-0".into(),
                namespace: "training".into(),
                containers: vec![proto::ContainerResources {
                    name: "trainer".into(),
                    devices: vec![
                        proto::ContainerDevices {
                            resource_name: "nvidia.com/gpu".into(),
                            device_ids: vec!["GPU-a".into(), "GPU-b::1".into()],
                        },
                        proto::ContainerDevices {
                            resource_name: "example.com/nic".into(),
                            device_ids: vec!["eth7".into()],
                        },
                        proto::ContainerDevices {
                            resource_name: "nvidia.com/gpu.shared".into(),
                            device_ids: vec!["GPU-c::2".into()],
                        },
                    ],
                }],
            }],
        };
        let mut bytes = resp.encode_to_vec();
        // An unknown field (number 99, a string) at the top level.
        bytes.extend_from_slice(&[0x9a, 0x06, 3, b'x', b'y', b'z']);
        let map = decode_list(&bytes, &[]).unwrap();
        assert_eq!(map.allocations.len(), 2);
        assert_eq!(map.allocations[1].replica.as_deref(), Some("1"));
        let map = decode_list(&bytes, &["nvidia.com/gpu.shared".into()]).unwrap();
        assert_eq!(map.allocations.len(), 3);
        assert_eq!(map.allocations[2].resource, "nvidia.com/gpu.shared");
        assert!(decode_list(&[0xff, 0xff], &[]).is_err());
    }

    #[test]
    fn a_stale_mapping_is_dropped_after_keep_for() {
        let latest = Latest::new(true, Duration::from_millis(10));
        assert_eq!(
            latest.status().error.as_deref(),
            Some("no answer from the kubelet yet")
        );
        latest.store(Ok(PodMap {
            allocations: vec![Allocation {
                namespace: "n".into(),
                pod: "p".into(),
                container: "c".into(),
                resource: "nvidia.com/gpu".into(),
                device: Device::Index(0),
                replica: None,
            }],
        }));
        assert!(latest.current().is_some());
        assert_eq!(latest.status().error, None);
        latest.store(Err("boom".into()));
        assert!(latest.current().is_some(), "kept while young");
        assert_eq!(latest.status().error.as_deref(), Some("boom"));
        std::thread::sleep(Duration::from_millis(80));
        assert!(latest.current().is_none(), "dropped after keep_for");
        assert_eq!(latest.status().allocations, 0);
        assert!(latest.status().age.unwrap() >= Duration::from_millis(60));
        assert!(Latest::new(false, Duration::from_secs(1))
            .current()
            .is_none());
    }
}
