//! The agent's configuration (`/etc/gpuops/agent.toml`), every option with its
//! default. `config/agent.example.toml` documents the same options; a test
//! parses it so the two cannot drift.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use regex::Regex;

use crate::config::{
    anchored_regex, positive_secs, read_file, read_log_section, read_web_limits, ConfigErrors,
    Reader, WebLimits,
};
use crate::exec_auth::ExecPublicKey;
use crate::host::HostRoots;

/// Default agent port: not used by node_exporter (9100), dcgm-exporter (9400)
/// or nvidia_gpu_exporter (9835).
pub const DEFAULT_AGENT_PORT: u16 = 9949;

/// Which GPU backend the agent reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuBackendChoice {
    /// NVML if it loads, else no GPU metrics (and a log line saying why).
    Auto,
    /// NVML; same as `Auto` but the intent is logged as a warning when missing.
    Nvml,
    /// Replay a JSON fixture (tests and demos); labelled fake everywhere.
    Fake(PathBuf),
    /// No GPU collector.
    Disabled,
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub listen: SocketAddr,
    pub roots: HostRoots,
    pub log: LogConfig,
    pub collectors: CollectorsConfig,
    pub cpu: CpuConfig,
    pub storage: StorageConfig,
    pub gpu: GpuConfig,
    pub exec: ExecConfig,
    /// This node's identity: signed exec requests must name it. Defaults to
    /// the host name up to the first dot.
    pub node_name: String,
    /// `[web]`: connection cap and timeouts of the HTTP server.
    pub web: WebLimits,
    /// TLS and basic auth in exporter-toolkit's format (`--web.config.file`).
    pub web_config_file: Option<PathBuf>,
    /// `[node_state]`: whether the scheduler has this node out.
    pub node_state: NodeStateConfig,
    /// `[kubernetes]`: pod names from the kubelet's pod-resources socket.
    pub kubernetes: KubernetesConfig,
}

/// `[kubernetes]`: which pod holds which GPU, read from the kubelet's
/// pod-resources API (`src/kubelet/`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubernetesConfig {
    /// `enabled` (`"auto"`): `auto` reads the socket when it exists at start.
    pub enabled: KubernetesEnabled,
    /// `pod_resources_socket` (`/var/lib/kubelet/pod-resources/kubelet.sock`).
    pub pod_resources_socket: PathBuf,
    /// `resource_names` (`[]`): resources mapped besides `nvidia.com/gpu`
    /// and `nvidia.com/mig-*` (e.g. `nvidia.com/gpu.shared`).
    pub resource_names: Vec<String>,
    /// `refresh_interval_secs` (10): how often `List` is called in the background.
    pub refresh_interval: Duration,
}

/// `[kubernetes] enabled`: `"auto"`, `true` or `false`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KubernetesEnabled {
    Auto,
    On,
    Off,
}

/// The kubelet's pod-resources socket.
pub const DEFAULT_POD_RESOURCES_SOCKET: &str = "/var/lib/kubelet/pod-resources/kubelet.sock";

impl Default for KubernetesConfig {
    fn default() -> Self {
        KubernetesConfig {
            enabled: KubernetesEnabled::Auto,
            pod_resources_socket: PathBuf::from(DEFAULT_POD_RESOURCES_SOCKET),
            resource_names: Vec::new(),
            refresh_interval: Duration::from_secs(10),
        }
    }
}

/// `[node_state]`: which scheduler's view of this node the agent exports
/// (`src/collector/node_state.rs`); each off by default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeStateConfig {
    /// `slurm` (false): run `scontrol show node <node_name> --oneliner`
    /// every 60 s (found on the default search path and `[exec] path`).
    pub slurm: bool,
    /// `kubernetes` (false): reserved; `true` is refused (not read yet).
    pub kubernetes: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// `text` or `json`.
    pub json: bool,
    /// A tracing `EnvFilter` directive, e.g. `info` or `gpuops=debug`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            json: false,
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct CollectorsConfig {
    pub cpu: bool,
    pub memory: bool,
    pub oom: bool,
    pub storage: bool,
    pub gpu: bool,
    /// The deadline of one collector's run within a scrape.
    pub deadline: Duration,
}

#[derive(Debug, Clone)]
pub struct CpuConfig {
    /// How often /proc/stat is sampled in the background.
    pub sample_interval: Duration,
    /// The window `cpu_utilization_percent` is computed over.
    pub utilization_window: Duration,
    /// Extra cgroup v2 directories (relative to `<sysfs>/fs/cgroup`) whose
    /// `cpu.stat` is exported besides the first-level ones.
    pub throttle_cgroups: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct StorageConfig {
    /// Mount points exported (anchored regex); default all.
    pub mount_include: Option<Regex>,
    /// Mount points skipped (anchored regex).
    pub mount_exclude: Regex,
    /// Filesystem types skipped (pseudo filesystems).
    pub fs_type_exclude: Vec<String>,
    /// How long one `statvfs` may take before the mount is reported stuck.
    pub statvfs_deadline: Duration,
}

#[derive(Debug, Clone)]
pub struct GpuConfig {
    pub backend: GpuBackendChoice,
    /// Add `DCGM_FI_DEV_*` names for the common fields.
    pub dcgm_compat: bool,
    /// The deadline of one NVML pass over all GPUs.
    pub deadline: Duration,
    /// Read the GPUs' processes: GPU memory and SM utilization per workload
    /// (Slurm job, Kubernetes pod, systemd unit, container).
    pub process_metrics: bool,
    /// Also export the per-pid series (`gpu_process_*`); off by default, as
    /// pids churn series on a busy cluster.
    pub per_pid_metrics: bool,
    /// Measure GPM (SM activity, occupancy, tensor and pipe activity, DRAM,
    /// PCIe and NVLink bandwidth) on GPUs that support it.
    pub gpm: bool,
    /// How often a GPM window is measured in the background.
    pub gpm_interval: Duration,
    /// How long one GPM window is (the two samples are this far apart).
    pub gpm_window: Duration,
    /// How often the slow values (energy counter, power limit, ECC totals,
    /// retired pages, remapped rows) are read in the background.
    pub slow_interval: Duration,
    /// Fake backend only: simulated latency of every NVML call.
    pub fake_call_latency: Duration,
}

#[derive(Debug, Clone)]
pub struct ExecConfig {
    /// The bot's Ed25519 public keys (several during a rotation); none keeps
    /// `POST /v1/exec` off.
    pub public_keys: Vec<ExecPublicKey>,
    /// Where the public keys came from (for the log line).
    pub public_key_files: Vec<PathBuf>,
    /// This node's own runbook directory.
    pub runbooks_dir: PathBuf,
    /// Cap on the stdout and stderr returned per step.
    pub output_cap_bytes: usize,
    /// `[exec] path`: directories searched for a step's binaries named by
    /// name after the default ones (`runbook::exec::resolve::DEFAULT_SEARCH_PATH`:
    /// `/v1/plan` and `/v1/exec` resolve `scontrol` to `/opt/slurm/bin/scontrol`).
    pub path: Vec<PathBuf>,
    /// The procfs root (`[paths] procfs`) where a `releases_gpu` step's plan
    /// lists the NVML holders.
    pub procfs: PathBuf,
}

pub const DEFAULT_MOUNT_EXCLUDE: &str =
    "/(dev|proc|sys|run/credentials|run/user/\\d+/.+|var/lib/docker/.+|var/lib/kubelet/.+|snap/.+)(/.*)?";

pub const DEFAULT_FS_TYPE_EXCLUDE: &[&str] = &[
    "autofs",
    "binfmt_misc",
    "bpf",
    "cgroup",
    "cgroup2",
    "configfs",
    "debugfs",
    "devpts",
    "devtmpfs",
    "efivarfs",
    "fusectl",
    "hugetlbfs",
    "iso9660",
    "mqueue",
    "nsfs",
    "overlay",
    "proc",
    "procfs",
    "pstore",
    "ramfs",
    "rpc_pipefs",
    "securityfs",
    "selinuxfs",
    "squashfs",
    "sysfs",
    "tracefs",
    "tmpfs",
    "fuse.lxcfs",
    "fuse.portal",
    "fuse.gvfsd-fuse",
    "nfsd",
];

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], DEFAULT_AGENT_PORT)),
            roots: HostRoots::default(),
            log: LogConfig::default(),
            collectors: CollectorsConfig {
                cpu: true,
                memory: true,
                oom: true,
                storage: true,
                gpu: true,
                deadline: Duration::from_secs(4),
            },
            cpu: CpuConfig {
                sample_interval: Duration::from_secs(1),
                utilization_window: Duration::from_secs(10),
                throttle_cgroups: Vec::new(),
            },
            storage: StorageConfig {
                mount_include: None,
                mount_exclude: anchored_regex(DEFAULT_MOUNT_EXCLUDE.into())
                    .unwrap_or_else(|_| Regex::new("^$").unwrap_or_else(|_| unreachable!())),
                fs_type_exclude: DEFAULT_FS_TYPE_EXCLUDE
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
                statvfs_deadline: Duration::from_secs(2),
            },
            gpu: GpuConfig {
                backend: GpuBackendChoice::Auto,
                dcgm_compat: false,
                deadline: Duration::from_secs(2),
                process_metrics: true,
                per_pid_metrics: false,
                gpm: true,
                gpm_interval: Duration::from_secs(15),
                gpm_window: Duration::from_secs(1),
                slow_interval: Duration::from_secs(30),
                fake_call_latency: Duration::ZERO,
            },
            node_name: crate::exec_auth::local_node_name(),
            exec: ExecConfig {
                public_keys: Vec::new(),
                public_key_files: Vec::new(),
                runbooks_dir: PathBuf::from("/usr/share/gpuops/runbooks"),
                output_cap_bytes: 64 * 1024,
                path: Vec::new(),
                procfs: PathBuf::from("/proc"),
            },
            web: WebLimits::default(),
            web_config_file: None,
            node_state: NodeStateConfig::default(),
            kubernetes: KubernetesConfig::default(),
        }
    }
}

impl AgentConfig {
    /// Reads and validates `path`, reporting every error in it at once.
    pub fn from_file(path: &Path) -> Result<AgentConfig, ConfigErrors> {
        let text = read_file(path)?;
        AgentConfig::from_str(path, &text)
    }

    /// Validates `text`, which came from `path` (used in error messages).
    pub fn from_str(path: &Path, text: &str) -> Result<AgentConfig, ConfigErrors> {
        let (mut r, mut root) = Reader::parse(path, text)?;
        let mut c = AgentConfig::default();

        if let Some(v) = r.get_with(&mut root, "listen", |s: String| {
            s.parse::<SocketAddr>()
                .map_err(|e| format!("{s:?} is not an address:port ({e})"))
        }) {
            c.listen = v;
        }

        if let Some(v) = r.get_with(&mut root, "web_config_file", non_empty_path) {
            c.web_config_file = Some(v);
        }

        if let Some(s) = r.table(&mut root, "log") {
            c.log = read_log_section(&mut r, s);
        }

        if let Some(mut s) = r.table(&mut root, "web") {
            read_web_limits(&mut r, &mut s, &mut c.web);
            r.finish(s);
        }

        if let Some(mut s) = r.table(&mut root, "paths") {
            for (key, slot) in [
                ("procfs", &mut c.roots.procfs),
                ("sysfs", &mut c.roots.sysfs),
                ("rootfs", &mut c.roots.rootfs),
                ("kmsg", &mut c.roots.kmsg),
            ] {
                if let Some(v) = r.get_with(&mut s, key, non_empty_path) {
                    *slot = v;
                }
            }
            r.finish(s);
        }

        if let Some(mut s) = r.table(&mut root, "collectors") {
            let cs = &mut c.collectors;
            for (key, slot) in [
                ("cpu", &mut cs.cpu),
                ("memory", &mut cs.memory),
                ("oom", &mut cs.oom),
                ("storage", &mut cs.storage),
                ("gpu", &mut cs.gpu),
            ] {
                if let Some(v) = r.get(&mut s, key) {
                    *slot = v;
                }
            }
            if let Some(v) = r.get_with(&mut s, "deadline_secs", positive_secs) {
                cs.deadline = v;
            }
            r.finish(s);
        }

        if let Some(mut s) = r.table(&mut root, "node_state") {
            if let Some(v) = r.get(&mut s, "slurm") {
                c.node_state.slurm = v;
            }
            if let Some(v) = r.get::<bool>(&mut s, "kubernetes") {
                if v {
                    r.error(
                        &s,
                        "kubernetes",
                        "the Kubernetes node state is not read yet: leave it false (Slurm only)",
                    );
                }
            }
            r.finish(s);
        }

        if let Some(mut s) = r.table(&mut root, "kubernetes") {
            let k = &mut c.kubernetes;
            if let Some(v) = r.get_with(&mut s, "enabled", |v: toml::Value| match v {
                toml::Value::Boolean(true) => Ok(KubernetesEnabled::On),
                toml::Value::Boolean(false) => Ok(KubernetesEnabled::Off),
                toml::Value::String(s) if s == "auto" => Ok(KubernetesEnabled::Auto),
                other => Err(format!("must be \"auto\", true or false, got {other}")),
            }) {
                k.enabled = v;
            }
            if let Some(v) = r.get_with(&mut s, "pod_resources_socket", non_empty_path) {
                k.pod_resources_socket = v;
            }
            if let Some(v) = r.get_with(&mut s, "resource_names", |v: Vec<String>| {
                match v.iter().find(|n| !is_resource_name(n)) {
                    Some(bad) => Err(format!("{bad:?} is not a resource name (domain/name)")),
                    None => Ok(v),
                }
            }) {
                k.resource_names = v;
            }
            if let Some(v) = r.get_with(&mut s, "refresh_interval_secs", positive_secs) {
                k.refresh_interval = v;
            }
            r.finish(s);
        }

        if let Some(mut s) = r.table(&mut root, "cpu") {
            if let Some(v) = r.get_with(&mut s, "sample_interval_secs", positive_secs) {
                c.cpu.sample_interval = v;
            }
            if let Some(v) = r.get_with(&mut s, "utilization_window_secs", positive_secs) {
                c.cpu.utilization_window = v;
            }
            if let Some(v) = r.get_with(&mut s, "throttle_cgroups", |v: Vec<String>| {
                match v.iter().find(|p| p.contains("..") || p.is_empty()) {
                    Some(bad) => Err(format!("{bad:?} is not a cgroup path")),
                    None => Ok(v),
                }
            }) {
                c.cpu.throttle_cgroups = v;
            }
            if c.cpu.utilization_window < c.cpu.sample_interval * 2 {
                r.error(
                    &s,
                    "utilization_window_secs",
                    "must be at least twice sample_interval_secs",
                );
            }
            r.finish(s);
        }

        if let Some(mut s) = r.table(&mut root, "storage") {
            if let Some(v) = r.get_with(&mut s, "mount_include", anchored_regex) {
                c.storage.mount_include = Some(v);
            }
            if let Some(v) = r.get_with(&mut s, "mount_exclude", anchored_regex) {
                c.storage.mount_exclude = v;
            }
            if let Some(v) = r.get(&mut s, "fs_type_exclude") {
                c.storage.fs_type_exclude = v;
            }
            if let Some(v) = r.get_with(&mut s, "statvfs_deadline_secs", positive_secs) {
                c.storage.statvfs_deadline = v;
            }
            r.finish(s);
        }

        if let Some(mut s) = r.table(&mut root, "gpu") {
            let backend: Option<String> = r.get(&mut s, "backend");
            let fixture: Option<PathBuf> = r.get_with(&mut s, "fake_fixture", non_empty_path);
            match (backend.as_deref(), fixture) {
                (None | Some("auto"), None) => {}
                (Some("nvml"), None) => c.gpu.backend = GpuBackendChoice::Nvml,
                (Some("none"), None) => c.gpu.backend = GpuBackendChoice::Disabled,
                (None | Some("fake"), Some(f)) => c.gpu.backend = GpuBackendChoice::Fake(f),
                (Some("fake"), None) => r.error(&s, "backend", "\"fake\" needs fake_fixture"),
                (Some(b @ ("auto" | "nvml" | "none")), Some(_)) => r.error(
                    &s,
                    "fake_fixture",
                    format!("only used with backend = \"fake\", not {b:?}"),
                ),
                (Some(b), _) => r.error(
                    &s,
                    "backend",
                    format!("must be \"auto\", \"nvml\", \"fake\" or \"none\", got {b:?}"),
                ),
            }
            if let Some(v) = r.get(&mut s, "dcgm_compat") {
                c.gpu.dcgm_compat = v;
            }
            if let Some(v) = r.get_with(&mut s, "deadline_secs", positive_secs) {
                c.gpu.deadline = v;
            }
            if let Some(v) = r.get(&mut s, "process_metrics") {
                c.gpu.process_metrics = v;
            }
            if let Some(v) = r.get(&mut s, "per_pid_metrics") {
                c.gpu.per_pid_metrics = v;
            }
            if let Some(v) = r.get(&mut s, "gpm") {
                c.gpu.gpm = v;
            }
            if let Some(v) = r.get_with(&mut s, "gpm_interval_secs", positive_secs) {
                c.gpu.gpm_interval = v;
            }
            if let Some(v) = r.get_with(&mut s, "gpm_window_secs", positive_secs) {
                if v > Duration::from_secs(60) {
                    r.error(&s, "gpm_window_secs", "must be at most 60 seconds");
                } else {
                    c.gpu.gpm_window = v;
                }
            }
            if c.gpu.gpm_window > c.gpu.gpm_interval {
                r.error(
                    &s,
                    "gpm_window_secs",
                    format!(
                        "must not exceed gpm_interval_secs ({}s)",
                        c.gpu.gpm_interval.as_secs_f64()
                    ),
                );
            }
            if let Some(v) = r.get_with(&mut s, "slow_interval_secs", positive_secs) {
                c.gpu.slow_interval = v;
            }
            if let Some(v) = r.get(&mut s, "fake_call_latency_us") {
                let v: u64 = v;
                c.gpu.fake_call_latency = Duration::from_micros(v);
            }
            r.finish(s);
        }

        if let Some(v) = r.get_with(&mut root, "node_name", |n: String| {
            if crate::exec_auth::is_node_name(&n) {
                Ok(n)
            } else {
                Err(format!("{n:?} is not a host name"))
            }
        }) {
            c.node_name = v;
        }

        if let Some(mut s) = r.table(&mut root, "exec") {
            for old in ["secret", "secret_file"] {
                if s.keys().iter().any(|k| k == old) {
                    let _: Option<toml::Value> = r.get(&mut s, old);
                    r.error(
                        &s,
                        old,
                        "shared exec secrets were replaced by the bot's Ed25519 key: run `gpuops keygen`, give the bot the private key ([agents] signing_key_file) and the agents the public key (public_key_files)",
                    );
                }
            }
            if let Some(files) = r.get::<Vec<PathBuf>>(&mut s, "public_key_files") {
                for f in files {
                    match ExecPublicKey::from_file(&f) {
                        Ok(k) => c.exec.public_keys.push(k),
                        Err(e) => r.error(&s, "public_key_files", e),
                    }
                    c.exec.public_key_files.push(f);
                }
            }
            if let Some(v) = r.get_with(&mut s, "runbooks_dir", non_empty_path) {
                c.exec.runbooks_dir = v;
            }
            if let Some(v) = r.get_with(&mut s, "output_cap_bytes", |n: i64| {
                if (1024..=16 * 1024 * 1024).contains(&n) {
                    Ok(n as usize)
                } else {
                    Err(format!("must be between 1024 and 16777216, got {n}"))
                }
            }) {
                c.exec.output_cap_bytes = v;
            }
            if let Some(v) = r.get_with(&mut s, "path", |dirs: Vec<PathBuf>| {
                match dirs.iter().find(|d| !d.is_absolute()) {
                    Some(d) => Err(format!("{} is not an absolute directory", d.display())),
                    None => Ok(dirs),
                }
            }) {
                c.exec.path = v;
            }
            r.finish(s);
        }
        c.exec.procfs = c.roots.procfs.clone();

        r.finish(root);
        r.into_result().map(|()| c)
    }
}

fn non_empty_path(p: PathBuf) -> Result<PathBuf, String> {
    if p.as_os_str().is_empty() {
        Err("must not be empty".into())
    } else {
        Ok(p)
    }
}

/// An extended resource name: `domain/name`, letters, digits, `-`, `_`, `.`.
fn is_resource_name(n: &str) -> bool {
    let ok = |p: &str| {
        !p.is_empty()
            && p.len() <= 253
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    matches!(n.split_once('/'), Some((d, name)) if ok(d) && ok(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> Vec<String> {
        match AgentConfig::from_str(Path::new("agent.toml"), text) {
            Ok(_) => Vec::new(),
            Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
        }
    }

    #[test]
    fn kubernetes_section_enabled_auto_true_false_and_bad_values() {
        let c = AgentConfig::from_str(Path::new("a.toml"), "").unwrap();
        assert_eq!(c.kubernetes, KubernetesConfig::default());
        let c = AgentConfig::from_str(
            Path::new("a.toml"),
            "[kubernetes]\nenabled = true\npod_resources_socket = \"/run/k.sock\"\nresource_names = [\"nvidia.com/gpu.shared\"]\nrefresh_interval_secs = 30\n",
        )
        .unwrap();
        assert_eq!(c.kubernetes.enabled, KubernetesEnabled::On);
        assert_eq!(
            c.kubernetes.pod_resources_socket,
            PathBuf::from("/run/k.sock")
        );
        assert_eq!(c.kubernetes.resource_names, vec!["nvidia.com/gpu.shared"]);
        assert_eq!(c.kubernetes.refresh_interval, Duration::from_secs(30));
        let c =
            AgentConfig::from_str(Path::new("a.toml"), "[kubernetes]\nenabled = false\n").unwrap();
        assert_eq!(c.kubernetes.enabled, KubernetesEnabled::Off);
        let e = errors("[kubernetes]\nenabled = \"yes\"\nresource_names = [\"gpu\"]\nrefresh_interval_secs = 0\nsocket = \"x\"\n");
        assert_eq!(e.len(), 4, "{e:?}");
    }

    #[test]
    fn empty_file_is_the_default() {
        let c = AgentConfig::from_str(Path::new("a.toml"), "").unwrap();
        assert_eq!(c.listen.port(), DEFAULT_AGENT_PORT);
        assert!(c.exec.public_keys.is_empty());
        assert_eq!(c.gpu.backend, GpuBackendChoice::Auto);
    }

    #[test]
    fn every_error_is_reported_at_once() {
        let text = "listen = \"nowhere\"\nbogus = 1\n\n[cpu]\nsample_interval_secs = -1\n\n[storage]\nmount_exclude = \"(\"\n[gpu]\nbackend = \"cuda\"\ndcgm_compat = \"yes\"\n";
        expect_test::expect![[r#"
            [
                "agent.toml:1: listen: \"nowhere\" is not an address:port (invalid socket address syntax)",
                "agent.toml:2: bogus: unknown key",
                "agent.toml:5: cpu.sample_interval_secs: must be a positive number of seconds, got -1",
                "agent.toml:8: storage.mount_exclude: invalid regex \"(\": unclosed group",
                "agent.toml:10: gpu.backend: must be \"auto\", \"nvml\", \"fake\" or \"none\", got \"cuda\"",
                "agent.toml:11: gpu.dcgm_compat: invalid type: string \"yes\", expected a boolean",
            ]
        "#]]
        .assert_debug_eq(&errors(text));
    }

    #[test]
    fn syntax_error_names_the_line() {
        let e = errors("listen = \"0.0.0.0:1\"\n[cpu\n");
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].starts_with("agent.toml:2:"), "{e:?}");
    }

    #[test]
    fn public_keys_are_read_and_old_secrets_explained() {
        let dir = tempfile::tempdir().unwrap();
        let signer = crate::exec_auth::ExecSigner::generate();
        let p = dir.path().join("exec.pub");
        std::fs::write(&p, signer.public_key().to_pem().unwrap()).unwrap();
        let text = format!(
            "node_name = \"gpu-node-17\"\n[exec]\npublic_key_files = [{:?}]\n",
            p.display().to_string()
        );
        let c = AgentConfig::from_str(Path::new("a.toml"), &text).unwrap();
        assert_eq!(c.exec.public_keys, vec![signer.public_key()]);
        assert_eq!(c.node_name, "gpu-node-17");
        let e = errors("node_name = \"10.0.0.1:9949\"\n[exec]\nsecret = \"x\"\npublic_key_files = [\"/nonexistent.pub\"]\n");
        assert_eq!(e.len(), 3, "{e:?}");
        assert!(
            e[0].contains("node_name") && e[0].contains("not a host name"),
            "{e:?}"
        );
        assert!(
            e[1].contains("exec.secret") && e[1].contains("gpuops keygen"),
            "{e:?}"
        );
        assert!(
            e[2].contains("exec.public_key_files") && e[2].contains("/nonexistent.pub"),
            "{e:?}"
        );
    }

    #[test]
    fn node_state_is_off_by_default_and_kubernetes_is_refused() {
        let c = AgentConfig::from_str(Path::new("a.toml"), "").unwrap();
        assert_eq!(c.node_state, NodeStateConfig::default());
        assert!(!c.node_state.slurm);
        let c = AgentConfig::from_str(Path::new("a.toml"), "[node_state]\nslurm = true\n").unwrap();
        assert!(c.node_state.slurm);
        let e = errors("[node_state]\nkubernetes = true\nsulrm = true\n");
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(
            e.iter()
                .any(|x| x.contains("node_state.kubernetes") && x.contains("not read yet")),
            "{e:?}"
        );
        assert!(e.iter().any(|x| x.contains("sulrm")), "{e:?}");
    }

    #[test]
    fn shipped_example_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/agent.example.toml");
        if let Err(e) = AgentConfig::from_file(&path) {
            panic!("{e}");
        }
    }

    #[test]
    fn gpu_gpm_and_workload_options() {
        let c = AgentConfig::default();
        assert!(c.gpu.gpm && c.gpu.process_metrics && !c.gpu.per_pid_metrics);
        assert_eq!(
            (c.gpu.gpm_interval, c.gpu.gpm_window),
            (Duration::from_secs(15), Duration::from_secs(1))
        );
        let text = "[gpu]\ngpm_interval_secs = 30\ngpm_window_secs = 0.5\nper_pid_metrics = true\nfake_call_latency_us = 200\n";
        let c = AgentConfig::from_str(Path::new("agent.toml"), text).unwrap();
        assert_eq!(c.gpu.gpm_interval, Duration::from_secs(30));
        assert_eq!(c.gpu.gpm_window, Duration::from_millis(500));
        assert!(c.gpu.per_pid_metrics);
        assert_eq!(c.gpu.fake_call_latency, Duration::from_micros(200));
        let e = AgentConfig::from_str(
            Path::new("agent.toml"),
            "[gpu]\ngpm_interval_secs = 1\ngpm_window_secs = 2\n",
        )
        .err()
        .unwrap()
        .0;
        assert!(
            e.len() == 1
                && e[0]
                    .to_string()
                    .contains("gpu.gpm_window_secs: must not exceed gpm_interval_secs"),
            "{e:?}"
        );
    }

    #[test]
    fn exec_path_extends_the_search_path_with_absolute_directories() {
        let c = AgentConfig::from_str(
            Path::new("agent.toml"),
            "[exec]\npath = [\"/opt/site/bin\"]\n",
        )
        .unwrap();
        assert_eq!(c.exec.path, vec![PathBuf::from("/opt/site/bin")]);
        let e = errors("[exec]\npath = [\"bin\"]\n");
        assert!(
            e[0].contains("exec.path") && e[0].contains("not an absolute"),
            "{e:?}"
        );
    }
}
