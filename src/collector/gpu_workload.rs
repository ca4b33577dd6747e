//! Who uses each GPU: a process's workload (Slurm job and user, Kubernetes
//! pod and container, container, systemd unit) from its `/proc/<pid>/cgroup`
//! text, and the per-GPU sums the GPU collector exports
//! (`gpu_workload_*`, `gpu_allocated_idle`).
//!
//! With the kubelet's pod-resources mapping ([`crate::kubelet::PodMap`]):
//! `gpu_pod_info` (one series per allocated device) and the pod's namespace,
//! name and container on a GPU's `gpu_workload_*` series when the
//! attribution is unambiguous ([`pod_on_gpu`]).
//!
//! Pure functions over text already read by the collector through
//! [`crate::host::HostRoots`] and over the GPU snapshot; this module must
//! not read files, call NVML or call the kubelet.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

use crate::collector::Sink;
use crate::gpu::{DeviceReading, MigReading, Snapshot};
use crate::kubelet::{Allocation, Device, PodMap};

/// The workload a process belongs to, as exported in labels.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Workload {
    /// `slurm`, `kubernetes`, `container`, `systemd` or `unknown`.
    pub kind: &'static str,
    /// The Slurm job id, the pod uid, `<runtime>:<id12>` of a container, the
    /// systemd unit; empty for `unknown`.
    pub id: String,
    /// The Slurm job's user (name when `/etc/passwd` has it, else the uid).
    pub user: String,
    /// A Kubernetes pod's container, `<runtime>:<id12>`, when it can be told.
    pub container: String,
}

impl Workload {
    pub fn unknown() -> Workload {
        Workload {
            kind: "unknown",
            ..Workload::default()
        }
    }
}

/// A process's workload from its cgroup file. The Slurm job's uid comes from
/// the cgroup path (`/slurm/uid_1000/job_42/...`, cgroup v1) when it is
/// there, else from `status_uid` (the process's real uid, for cgroup v2's
/// `/system.slice/slurmstepd.scope/job_42/...`); `user_name` turns a uid
/// into a name.
pub fn workload_from_cgroup(
    cgroup: &str,
    status_uid: Option<u32>,
    user_name: &dyn Fn(u32) -> Option<String>,
) -> Workload {
    // Slurm: any hierarchy with a job_<n> component under slurm.
    for line in cgroup.lines() {
        let Some(path) = line.splitn(3, ':').nth(2) else {
            continue;
        };
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        let under_slurm = parts
            .iter()
            .any(|p| p.starts_with("slurm") || p.starts_with("uid_"));
        let job = parts.iter().find_map(|p| {
            let n = p.strip_prefix("job_")?;
            (!n.is_empty() && n.chars().all(|c| c.is_ascii_digit())).then_some(n)
        });
        if let (true, Some(job)) = (under_slurm, job) {
            let uid = parts
                .iter()
                .find_map(|p| p.strip_prefix("uid_")?.parse::<u32>().ok())
                .or(status_uid);
            let user = uid
                .map(|u| user_name(u).unwrap_or_else(|| u.to_string()))
                .unwrap_or_default();
            return Workload {
                kind: "slurm",
                id: job.to_string(),
                user,
                container: String::new(),
            };
        }
    }
    let unit = unit_from_cgroup(cgroup).unwrap_or_default();
    if let Some(pod) = pod_uid(cgroup) {
        let container = if unit.starts_with("pod:") {
            String::new()
        } else {
            unit
        };
        return Workload {
            kind: "kubernetes",
            id: pod,
            user: String::new(),
            container,
        };
    }
    if unit.is_empty() {
        return Workload::unknown();
    }
    let kind = if unit.ends_with(".service") || unit.ends_with(".scope") {
        "systemd"
    } else {
        "container"
    };
    Workload {
        kind,
        id: unit,
        user: String::new(),
        container: String::new(),
    }
}

/// The Kubernetes pod uid in a cgroup path (`kubepods-...-pod<uid>.slice`
/// with `_` for `-`, or cgroupfs's `pod<uid>`).
fn pod_uid(cgroup: &str) -> Option<String> {
    let path = cgroup_path(cgroup)?;
    if !path.contains("kubepods") {
        return None;
    }
    for part in path.split('/').rev() {
        let stem = part.strip_suffix(".slice").unwrap_or(part);
        if let Some((_, uid)) = stem.rsplit_once("-pod") {
            if !uid.is_empty() {
                return Some(uid.replace('_', "-"));
            }
        }
        if let Some(uid) = part.strip_prefix("pod") {
            if !uid.is_empty() {
                return Some(uid.to_string());
            }
        }
    }
    None
}

/// The path that says where a process runs: cgroup v2's line, else v1's
/// `name=systemd` or `memory` hierarchy.
fn cgroup_path(text: &str) -> Option<&str> {
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .or_else(|| {
            text.lines().find_map(|l| {
                let mut f = l.splitn(3, ':');
                let (_, ctrl, path) = (f.next()?, f.next()?, f.next()?);
                (ctrl
                    .split(',')
                    .any(|c| c == "name=systemd" || c == "memory"))
                .then_some(path)
            })
        })
}

/// The systemd unit or container a process runs in, from its
/// `/proc/<pid>/cgroup`: `docker:<id12>`, `containerd:<id12>`, `crio:<id12>`,
/// `podman:<id12>`, `pod:<uid>` (a Kubernetes pod without a recognisable
/// container), else the innermost `*.service`/`*.scope` unit
/// (`slurmstepd.scope`, `ollama.service`). The cgroup v2 line wins over v1 lines.
pub fn unit_from_cgroup(text: &str) -> Option<String> {
    let path = cgroup_path(text)?;
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let is_id = |s: &str| s.len() >= 12 && s.chars().all(|c| c.is_ascii_hexdigit());
    let short = |s: &str| s[..12].to_string();
    for (i, part) in parts.iter().enumerate().rev() {
        let stem = part.strip_suffix(".scope").unwrap_or(part);
        for (prefix, runtime) in [
            ("docker-", "docker"),
            ("cri-containerd-", "containerd"),
            ("crio-", "crio"),
            ("libpod-", "podman"),
        ] {
            if let Some(id) = stem.strip_prefix(prefix) {
                if is_id(id) {
                    return Some(format!("{runtime}:{}", short(id)));
                }
            }
        }
        // cgroup v1 / cgroupfs driver: /docker/<id>, /kubepods/burstable/pod<uid>/<id>.
        if is_id(part) && i > 0 {
            let parent = parts[i - 1];
            let runtime = if parent == "docker" {
                "docker"
            } else if parent.starts_with("pod") || parent.contains("-pod") {
                "containerd"
            } else {
                continue;
            };
            return Some(format!("{runtime}:{}", short(part)));
        }
    }
    for part in parts.iter().rev() {
        let stem = part.strip_suffix(".slice").unwrap_or(part);
        if let Some(uid) = stem.rsplit_once("-pod").map(|(_, u)| u) {
            if !uid.is_empty() {
                return Some(format!("pod:{}", uid.replace('_', "-")));
            }
        }
        if let Some(uid) = part.strip_prefix("pod") {
            if !uid.is_empty() {
                return Some(format!("pod:{uid}"));
            }
        }
    }
    parts
        .iter()
        .rev()
        .find(|p| p.ends_with(".service") || p.ends_with(".scope"))
        .map(|p| p.to_string())
}

/// A Slurm job from a process's environment (`/proc/<pid>/environ`,
/// NUL-separated): `SLURM_JOB_ID` and `SLURM_JOB_USER`, for jobs whose
/// cgroup does not name them (Slurm without its cgroup plugin).
pub fn slurm_from_environ(environ: &str) -> Option<(String, Option<String>)> {
    let mut job = None;
    let mut user = None;
    for var in environ.split('\0') {
        if let Some(v) = var.strip_prefix("SLURM_JOB_ID=") {
            if !v.is_empty() && v.chars().all(|c| c.is_ascii_digit()) {
                job = Some(v.to_string());
            }
        } else if let Some(v) = var.strip_prefix("SLURM_JOB_USER=") {
            if !v.is_empty() {
                user = Some(v.to_string());
            }
        }
    }
    Some((job?, user))
}

/// The real uid from `/proc/<pid>/status` text (`Uid:\t1000\t1000\t...`).
pub fn uid_from_status(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The user name of `uid` in `/etc/passwd` text.
pub fn user_from_passwd(passwd: &str, uid: u32) -> Option<String> {
    let uid = uid.to_string();
    passwd.lines().find_map(|l| {
        let mut f = l.split(':');
        let (name, _pw, id) = (f.next()?, f.next()?, f.next()?);
        (id == uid && !name.is_empty()).then(|| name.to_string())
    })
}

/// One workload's use of one GPU.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct WorkloadUse {
    pub processes: u64,
    /// Sum over the processes that report it; `None` when none does.
    pub memory_used_bytes: Option<u64>,
    /// Sum over the processes that report it, at most 100.
    pub sm_utilization_percent: Option<f64>,
}

/// Sums processes (workload, memory, SM utilization) by workload.
pub fn sum_by_workload<'a>(
    processes: impl IntoIterator<Item = (&'a Workload, Option<u64>, Option<f64>)>,
) -> BTreeMap<&'a Workload, WorkloadUse> {
    let mut out: BTreeMap<&Workload, WorkloadUse> = BTreeMap::new();
    for (w, mem, sm) in processes {
        let u = out.entry(w).or_default();
        u.processes += 1;
        if let Some(m) = mem {
            *u.memory_used_bytes.get_or_insert(0) += m;
        }
        if let Some(s) = sm {
            let t = u.sm_utilization_percent.get_or_insert(0.0);
            *t = (*t + s).min(100.0);
        }
    }
    out
}

/// GPU memory at or above this counts as allocated even with no process
/// listed (a leaked context, a process in another PID namespace).
pub const ALLOCATED_MEMORY_FLOOR_BYTES: u64 = 1 << 30;
/// SM activity (GPM) or utilization below this counts as idle.
pub const IDLE_SM_PERCENT: f64 = 1.0;

/// `gpu_allocated_idle`: 1 when the GPU holds memory (a process has it, or
/// at least [`ALLOCATED_MEMORY_FLOOR_BYTES`] is in use) while its SMs are
/// idle (GPM SM activity, else NVML utilization, below [`IDLE_SM_PERCENT`]);
/// 0 otherwise; `None` when the activity or the memory is unknown.
pub fn allocated_idle(
    memory_used_bytes: Option<u64>,
    has_processes: bool,
    sm_active_percent: Option<f64>,
) -> Option<bool> {
    let activity = sm_active_percent?;
    let allocated = has_processes || memory_used_bytes? >= ALLOCATED_MEMORY_FLOOR_BYTES;
    Some(allocated && activity < IDLE_SM_PERCENT)
}

const POD_INFO: &str = "gpu_pod_info";
const POD_INFO_HELP: &str = "A device allocated to a Kubernetes container, 1 (kubelet pod-resources API v1 List on [kubernetes] pod_resources_socket, read in the background): uuid and gpu are the physical GPU's; replica is N of a shared GPU's <uuid>::N (time-slicing, MPS); MIG devices carry gpu_instance_id, compute_instance_id and mig_profile. Join on uuid (or gpu) to name the pods on a GPU.";

/// [`render_pod_info`] once per change of the kubelet's mapping or of the
/// GPUs it names, not once per scrape: the mapping changes only in the
/// background (every `[kubernetes] refresh_interval_secs`), so a scrape
/// appends the text rendered for it (110 pods on 8 GPUs with 56 MIG
/// instances: 56 series, about 17 KB).
#[derive(Default)]
pub struct PodInfoCache(Mutex<Option<PodInfoText>>);

struct PodInfoText {
    pods: Arc<PodMap>,
    devices: u64,
    body: String,
}

impl PodInfoCache {
    pub fn render(&self, snap: &Snapshot, pods: &Arc<PodMap>, sink: &mut Sink) {
        if pods.allocations.is_empty() {
            return;
        }
        let devices = device_key(snap);
        let mut cached = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let fresh = cached.as_ref().is_some_and(|c| {
            c.devices == devices && (Arc::ptr_eq(&c.pods, pods) || *c.pods == **pods)
        });
        if !fresh {
            let mut own = Sink::new();
            render_pod_info(snap, pods, &mut own);
            *cached = Some(PodInfoText {
                pods: pods.clone(),
                devices,
                body: own.body(POD_INFO).to_string(),
            });
        }
        if let Some(c) = cached.as_ref().filter(|c| !c.body.is_empty()) {
            sink.gauge_rendered(POD_INFO, POD_INFO_HELP, &c.body);
        }
    }
}

/// What [`render_pod_info`] reads of the GPUs, hashed: their indexes, names,
/// UUIDs and PCI addresses, and their MIG instances.
fn device_key(snap: &Snapshot) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for d in &snap.devices {
        (d.index, &d.uuid, &d.name, &d.pci_bus_id).hash(&mut h);
        for m in &d.mig {
            (
                &m.uuid,
                m.gpu_instance_id,
                m.compute_instance_id,
                &m.profile,
            )
                .hash(&mut h);
        }
    }
    h.finish()
}

/// `gpu_pod_info{gpu,uuid,name,pci_bus_id,namespace,pod,container,resource}`
/// 1 per allocated device, with `replica` for a shared GPU's `<uuid>::N` and
/// the MIG instance's labels (`gpu_instance_id`, `compute_instance_id`,
/// `mig_profile`) for a MIG device; `uuid` is always the physical GPU's. An
/// allocation of a device this node's backend does not list is left out.
pub fn render_pod_info(snap: &Snapshot, pods: &PodMap, sink: &mut Sink) {
    if pods.allocations.is_empty() {
        return;
    }
    let mut by_uuid: HashMap<&str, (&DeviceReading, Option<&MigReading>)> = HashMap::new();
    for d in &snap.devices {
        if !d.uuid.is_empty() {
            by_uuid.insert(&d.uuid, (d, None));
        }
        for m in d.mig.iter().filter(|m| !m.uuid.is_empty()) {
            by_uuid.insert(&m.uuid, (d, Some(m)));
        }
    }
    for a in &pods.allocations {
        let found = match &a.device {
            Device::Uuid(u) => by_uuid.get(u.as_str()).copied(),
            Device::Index(i) => snap
                .devices
                .iter()
                .find(|d| d.index == *i)
                .map(|d| (d, None)),
        };
        let Some((d, mig)) = found else {
            continue;
        };
        let idx = small_number(d.index);
        let gi = mig.and_then(|m| m.gpu_instance_id).map(small_number);
        let ci = mig.and_then(|m| m.compute_instance_id).map(small_number);
        let mig_labels = [
            gi.as_deref().map(|v| ("gpu_instance_id", v)),
            ci.as_deref().map(|v| ("compute_instance_id", v)),
            mig.map(|m| ("mig_profile", m.profile.as_str())),
        ];
        let pod_labels = [
            Some(("namespace", a.namespace.as_str())),
            Some(("pod", &a.pod)),
            Some(("container", &a.container)),
            Some(("resource", &a.resource)),
            a.replica.as_deref().map(|r| ("replica", r)),
        ];
        // On the stack: at most 12 labels.
        let mut labels = [("", ""); 12];
        let mut n = 0;
        let base = [
            ("gpu", &*idx),
            ("uuid", &d.uuid),
            ("name", &d.name),
            ("pci_bus_id", &d.pci_bus_id),
        ];
        for l in base
            .into_iter()
            .chain(mig_labels.into_iter().flatten())
            .chain(pod_labels.into_iter().flatten())
        {
            labels[n] = l;
            n += 1;
        }
        let labels = &labels[..n];
        sink.gauge(POD_INFO, POD_INFO_HELP, labels, 1.0);
    }
}

/// A GPU index or MIG instance id as text, without allocating for the
/// usual small ones.
fn small_number(n: u32) -> std::borrow::Cow<'static, str> {
    const SMALL: [&str; 16] = [
        "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15",
    ];
    match SMALL.get(n as usize) {
        Some(s) => std::borrow::Cow::Borrowed(s),
        None => std::borrow::Cow::Owned(n.to_string()),
    }
}

/// The pod named on one GPU's `gpu_workload_*` series.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodName<'a> {
    /// The pod uid (from the cgroup) the name is given to.
    pub uid: &'a str,
    pub namespace: &'a str,
    pub pod: &'a str,
    /// The container's name when the pod has one container on the GPU.
    pub container: Option<&'a str>,
}

/// The pod to name on GPU `d`'s workload series: the pod-resources API
/// names pods by namespace and name, the cgroup by uid, so a uid is named
/// only when it cannot be wrong: exactly one Kubernetes pod uid among the
/// GPU's processes and exactly one pod allocated the GPU (its whole GPU, a
/// MIG instance of it or replicas of it). Shared by several pods, or a pod
/// on it that holds no allocation: `None`, the uid stays.
pub fn pod_on_gpu<'a>(
    pods: &'a PodMap,
    d: &DeviceReading,
    workloads: impl IntoIterator<Item = &'a Workload>,
) -> Option<PodName<'a>> {
    let mut uid = None;
    for w in workloads.into_iter().filter(|w| w.kind == "kubernetes") {
        match uid {
            None => uid = Some(w.id.as_str()),
            Some(u) if u == w.id => {}
            Some(_) => return None,
        }
    }
    let uid = uid?;
    let on_gpu = |a: &&Allocation| match &a.device {
        Device::Uuid(u) => *u == d.uuid || d.mig.iter().any(|m| m.uuid == *u),
        Device::Index(i) => *i == d.index,
    };
    let mut held = pods.allocations.iter().filter(on_gpu);
    let first = held.next()?;
    let mut container = Some(first.container.as_str());
    for a in held {
        if a.namespace != first.namespace || a.pod != first.pod {
            return None;
        }
        if container != Some(a.container.as_str()) {
            container = None;
        }
    }
    Some(PodName {
        uid,
        namespace: &first.namespace,
        pod: &first.pod,
        container,
    })
}

/// A workload's labels with the pod named: `namespace` and `pod` added,
/// `container` the container's name when known (else the runtime id).
pub fn with_pod_name<'a>(
    labels: &[(&'a str, &'a str)],
    named: &PodName<'a>,
) -> Vec<(&'a str, &'a str)> {
    let mut out: Vec<(&str, &str)> = labels
        .iter()
        .map(|&(k, v)| match (k, named.container) {
            ("container", Some(c)) => (k, c),
            _ => (k, v),
        })
        .collect();
    out.push(("namespace", named.namespace));
    out.push(("pod", named.pod));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(cgroup: &str, expect: Option<&str>) {
        assert_eq!(unit_from_cgroup(cgroup).as_deref(), expect, "{cgroup:?}");
    }

    #[test]
    fn finds_the_unit_or_container_of_a_process() {
        check(
            "0::/system.slice/slurmstepd.scope/job_4242/step_0/user/task_0\n",
            Some("slurmstepd.scope"),
        );
        check("0::/system.slice/ollama.service\n", Some("ollama.service"));
        check(
            "0::/user.slice/user-1000.slice/user@1000.service/app.slice/session-3.scope\n",
            Some("session-3.scope"),
        );
        check(
            "0::/system.slice/docker-3f4e5d6c7b8a9f0e1d2c3b4a59687766554433221100ffeeddccbbaa99887766.scope\n",
            Some("docker:3f4e5d6c7b8a"),
        );
        check(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1c2d3e4f_5a6b_7c8d_9e0f_a1b2c3d4e5f6.slice/cri-containerd-aabbccddeeff00112233445566778899aabbccddeeff00112233445566778899.scope\n",
            Some("containerd:aabbccddeeff"),
        );
        check(
            "0::/kubepods.slice/kubepods-pod1c2d3e4f_5a6b_7c8d_9e0f_a1b2c3d4e5f6.slice/crio-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef.scope\n",
            Some("crio:0123456789ab"),
        );
        check(
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1c2d3e4f_5a6b_7c8d_9e0f_a1b2c3d4e5f6.slice\n",
            Some("pod:1c2d3e4f-5a6b-7c8d-9e0f-a1b2c3d4e5f6"),
        );
        check(
            "12:memory:/docker/3f4e5d6c7b8a9f0e1d2c3b4a59687766554433221100ffeeddccbbaa99887766\n1:name=systemd:/docker/3f4e5d6c7b8a9f0e1d2c3b4a59687766554433221100ffeeddccbbaa99887766\n",
            Some("docker:3f4e5d6c7b8a"),
        );
        check(
            "11:memory:/kubepods/burstable/pod1c2d3e4f-5a6b-7c8d-9e0f-a1b2c3d4e5f6/aabbccddeeff00112233445566778899aabbccddeeff00112233445566778899\n",
            Some("containerd:aabbccddeeff"),
        );
        check(
            "0::/machine.slice/libpod-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef.scope/container\n",
            Some("podman:0123456789ab"),
        );
        check("0::/\n", None);
        check("", None);
    }

    fn workload(cgroup: &str, status_uid: Option<u32>) -> Workload {
        let names = |uid: u32| (uid == 1000).then(|| "alice".to_string());
        workload_from_cgroup(cgroup, status_uid, &names)
    }

    fn w(kind: &'static str, id: &str, user: &str, container: &str) -> Workload {
        Workload {
            kind,
            id: id.into(),
            user: user.into(),
            container: container.into(),
        }
    }

    #[test]
    fn attributes_processes_to_their_workload() {
        // Slurm, cgroup v1: uid and job from the path.
        assert_eq!(
            workload(
                "12:memory:/slurm/uid_1000/job_8123/step_0/task_0\n1:name=systemd:/system.slice/slurmd.service\n",
                None
            ),
            w("slurm", "8123", "alice", "")
        );
        // Slurm, cgroup v2: job from the path, uid from /proc/<pid>/status.
        assert_eq!(
            workload(
                "0::/system.slice/slurmstepd.scope/job_7100/step_0/user/task_0\n",
                Some(1001)
            ),
            w("slurm", "7100", "1001", "")
        );
        assert_eq!(
            workload("0::/system.slice/slurmstepd.scope/job_7100/step_0\n", None),
            w("slurm", "7100", "", "")
        );
        // Kubernetes: the pod, and its container when the runtime says.
        assert_eq!(
            workload("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1c2d3e4f_5a6b_7c8d_9e0f_a1b2c3d4e5f6.slice/cri-containerd-aabbccddeeff00112233445566778899aabbccddeeff00112233445566778899.scope\n", None),
            w("kubernetes", "1c2d3e4f-5a6b-7c8d-9e0f-a1b2c3d4e5f6", "", "containerd:aabbccddeeff")
        );
        assert_eq!(
            workload("0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1c2d3e4f_5a6b_7c8d_9e0f_a1b2c3d4e5f6.slice\n", None),
            w("kubernetes", "1c2d3e4f-5a6b-7c8d-9e0f-a1b2c3d4e5f6", "", "")
        );
        assert_eq!(
            workload("11:memory:/kubepods/burstable/pod1c2d3e4f-5a6b-7c8d-9e0f-a1b2c3d4e5f6/aabbccddeeff00112233445566778899aabbccddeeff00112233445566778899\n", None),
            w("kubernetes", "1c2d3e4f-5a6b-7c8d-9e0f-a1b2c3d4e5f6", "", "containerd:aabbccddeeff")
        );
        // A plain container, a systemd unit, nothing.
        assert_eq!(
            workload("0::/system.slice/docker-3f4e5d6c7b8a9f0e1d2c3b4a59687766554433221100ffeeddccbbaa99887766.scope\n", Some(0)),
            w("container", "docker:3f4e5d6c7b8a", "", "")
        );
        assert_eq!(
            workload("0::/system.slice/ollama.service\n", Some(998)),
            w("systemd", "ollama.service", "", "")
        );
        assert_eq!(workload("0::/\n", None), Workload::unknown());
        assert_eq!(workload("", None), Workload::unknown());
        // A job_ component outside Slurm is not a Slurm job.
        assert_eq!(
            workload("0::/system.slice/cron.service/job_12\n", None),
            w("systemd", "cron.service", "", "")
        );
    }

    #[test]
    fn slurm_jobs_without_cgroups_come_from_the_environment() {
        assert_eq!(
            slurm_from_environ("HOME=/home/alice\0SLURM_JOB_ID=8123\0SLURM_JOB_USER=alice\0"),
            Some(("8123".to_string(), Some("alice".to_string())))
        );
        assert_eq!(
            slurm_from_environ("SLURM_JOB_ID=77"),
            Some(("77".to_string(), None))
        );
        assert_eq!(slurm_from_environ("SLURM_JOB_ID=$(x)\0"), None);
        assert_eq!(slurm_from_environ(""), None);
    }

    #[test]
    fn reads_uids_and_user_names() {
        assert_eq!(
            uid_from_status("Name:\tpython\nUid:\t1000\t1000\t1000\t1000\n"),
            Some(1000)
        );
        assert_eq!(uid_from_status("Name:\tx\n"), None);
        let passwd = "root:x:0:0:root:/root:/bin/bash\nalice:x:1000:1000::/home/alice:/bin/sh\n";
        assert_eq!(user_from_passwd(passwd, 1000).as_deref(), Some("alice"));
        assert_eq!(user_from_passwd(passwd, 7), None);
    }

    #[test]
    fn sums_by_workload_and_tells_idle_allocations() {
        let a = w("slurm", "1", "alice", "");
        let b = w("systemd", "x.service", "", "");
        let sums = sum_by_workload([
            (&a, Some(10), Some(60.0)),
            (&a, Some(5), Some(70.0)),
            (&b, None, None),
        ]);
        assert_eq!(
            sums[&a],
            WorkloadUse {
                processes: 2,
                memory_used_bytes: Some(15),
                sm_utilization_percent: Some(100.0)
            }
        );
        assert_eq!(sums[&b].memory_used_bytes, None);
        assert_eq!(allocated_idle(Some(0), true, Some(0.2)), Some(true));
        assert_eq!(allocated_idle(Some(2 << 30), false, Some(0.0)), Some(true));
        assert_eq!(allocated_idle(Some(1 << 20), false, Some(0.0)), Some(false));
        assert_eq!(allocated_idle(Some(2 << 30), true, Some(50.0)), Some(false));
        assert_eq!(allocated_idle(Some(2 << 30), true, None), None);
        assert_eq!(allocated_idle(None, true, Some(0.0)), Some(true));
    }

    fn alloc(pod: &str, container: &str, device: &str) -> Allocation {
        let (device, replica) = crate::kubelet::parse_device_id(device);
        Allocation {
            namespace: "training".into(),
            pod: pod.into(),
            container: container.into(),
            resource: "nvidia.com/gpu".into(),
            device,
            replica,
        }
    }

    #[test]
    fn workload_named_only_when_one_pod_holds_the_gpu() {
        let d = DeviceReading {
            index: 2,
            uuid: "GPU-2".into(),
            mig: vec![MigReading {
                uuid: "MIG-2a".into(),
                ..MigReading::default()
            }],
            ..DeviceReading::default()
        };
        let k = w("kubernetes", "uid-1", "", "containerd:aabbccddeeff");
        let other = w("kubernetes", "uid-2", "", "");
        let unit = w("systemd", "x.service", "", "");
        let one = PodMap {
            allocations: vec![
                alloc("llama-0", "trainer", "GPU-2"),
                alloc("b", "c", "GPU-9"),
            ],
        };
        let named = pod_on_gpu(&one, &d, [&k, &unit]).unwrap();
        assert_eq!(
            named,
            PodName {
                uid: "uid-1",
                namespace: "training",
                pod: "llama-0",
                container: Some("trainer")
            }
        );
        let labels = with_pod_name(
            &[
                ("workload", "uid-1"),
                ("container", "containerd:aabbccddeeff"),
            ],
            &named,
        );
        assert_eq!(
            labels,
            vec![
                ("workload", "uid-1"),
                ("container", "trainer"),
                ("namespace", "training"),
                ("pod", "llama-0")
            ]
        );
        // Two pod uids on the GPU: which is which cannot be told.
        assert_eq!(pod_on_gpu(&one, &d, [&k, &other]), None);
        // Two pods share it (replicas): the uid stays.
        let shared = PodMap {
            allocations: vec![alloc("a", "c", "GPU-2::0"), alloc("b", "c", "GPU-2::1")],
        };
        assert_eq!(pod_on_gpu(&shared, &d, [&k]), None);
        // One pod, by MIG instance and by index, two containers: no container name.
        let mig = PodMap {
            allocations: vec![alloc("a", "c1", "MIG-2a"), alloc("a", "c2", "nvidia2")],
        };
        let named = pod_on_gpu(&mig, &d, [&k]).unwrap();
        assert_eq!((named.pod, named.container), ("a", None));
        // Nothing allocated on it, or no Kubernetes process.
        assert_eq!(pod_on_gpu(&PodMap::default(), &d, [&k]), None);
        assert_eq!(pod_on_gpu(&one, &d, [&unit]), None);
    }

    /// The cached `gpu_pod_info` text is what rendering it gives, and is
    /// rendered again when the mapping or the GPUs change.
    #[test]
    fn pod_info_is_rendered_once_per_mapping_and_again_when_it_changes() {
        let snap = |name: &str| Snapshot {
            devices: vec![DeviceReading {
                index: 2,
                uuid: "GPU-2".into(),
                name: name.into(),
                ..DeviceReading::default()
            }],
            ..Snapshot::default()
        };
        let direct = |snap: &Snapshot, pods: &PodMap| {
            let mut s = Sink::new();
            render_pod_info(snap, pods, &mut s);
            s.into_text()
        };
        let cached = |cache: &PodInfoCache, snap: &Snapshot, pods: &Arc<PodMap>| {
            let mut s = Sink::new();
            cache.render(snap, pods, &mut s);
            s.into_text()
        };
        let cache = PodInfoCache::default();
        let h100 = snap("H100");
        let one = Arc::new(PodMap {
            allocations: vec![alloc("llama-0", "trainer", "GPU-2")],
        });
        let first = cached(&cache, &h100, &one);
        assert!(first.contains("pod=\"llama-0\""), "{first}");
        assert_eq!(first, direct(&h100, &one));
        // The same mapping (another Arc, equal content): the same text.
        let again = Arc::new((*one).clone());
        assert_eq!(cached(&cache, &h100, &again), first);
        // Another mapping, other GPUs: rendered again.
        let two = Arc::new(PodMap {
            allocations: vec![alloc("other-1", "c", "GPU-2")],
        });
        assert_eq!(cached(&cache, &h100, &two), direct(&h100, &two));
        let h200 = snap("H200");
        let text = cached(&cache, &h200, &two);
        assert!(text.contains("name=\"H200\""), "{text}");
        assert_eq!(text, direct(&h200, &two));
        // A mapping that names no GPU of this node: no family at all.
        let elsewhere = Arc::new(PodMap {
            allocations: vec![alloc("x", "c", "GPU-9")],
        });
        assert_eq!(cached(&cache, &h200, &elsewhere), "");
    }
}
