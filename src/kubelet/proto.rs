//! The kubelet's pod-resources API v1 messages (package `v1`,
//! `k8s.io/kubelet/pkg/apis/podresources/v1/api.proto`), only the five the
//! agent reads, with the kubelet's field numbers. Fields the kubelet sends
//! that are not declared here (`cpu_ids`, `memory`, `topology`,
//! `dynamic_resources`, anything newer) are skipped by prost's decoder.
//!
//! Data types only: no I/O here.

/// `ListPodResourcesRequest`: empty.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ListPodResourcesRequest {}

/// `ListPodResourcesResponse`: every pod on the node.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ListPodResourcesResponse {
    #[prost(message, repeated, tag = "1")]
    pub pod_resources: Vec<PodResources>,
}

/// `PodResources`: one pod (no uid: the API names pods by namespace/name).
#[derive(Clone, PartialEq, prost::Message)]
pub struct PodResources {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub namespace: String,
    #[prost(message, repeated, tag = "3")]
    pub containers: Vec<ContainerResources>,
}

/// `ContainerResources`: one container's devices (`cpu_ids` = 3,
/// `memory` = 4, `dynamic_resources` = 5 are not read).
#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerResources {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(message, repeated, tag = "2")]
    pub devices: Vec<ContainerDevices>,
}

/// `ContainerDevices`: the devices of one resource (`topology` = 3 is not read).
#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerDevices {
    #[prost(string, tag = "1")]
    pub resource_name: String,
    #[prost(string, repeated, tag = "2")]
    pub device_ids: Vec<String>,
}
