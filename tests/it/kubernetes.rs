//! Checks the Kubernetes manifests in `deploy/kubernetes/` (issue 25): every
//! file parses and is listed by its kustomization, the agent's DaemonSet is
//! locked down and points the agent at the host's mounts, the ServiceMonitor
//! names targets by node, the PrometheusRule equals the shipped rules, and the
//! ConfigMaps' configurations pass `gpuops check-config`. Reads files only;
//! never changes them. Offline: no kubectl, kubeconform or cluster.
#![allow(clippy::disallowed_methods)] // integration tests spawn the real binary

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use gpuops::config::agent::DEFAULT_AGENT_PORT;
use gpuops::config::bot::DEFAULT_BOT_PORT;
use gpuops::config::AgentConfig;
use serde::Deserialize as _;
use serde_norway::Value;

use crate::ops_support::repo;
use crate::support::gpuops;

fn k8s_dir() -> PathBuf {
    repo().join("deploy/kubernetes")
}

/// Every YAML document of a file (`---`-separated).
fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_norway::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|v| !v.is_null())
        .collect()
}

/// The one document of `deploy/kubernetes/<name>`.
fn manifest(name: &str) -> Value {
    let mut docs = documents(&k8s_dir().join(name));
    assert_eq!(docs.len(), 1, "{name}: one document");
    docs.remove(0)
}

/// Every `*.yaml` file under `dir`, recursively, sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let p = e.expect("dir entry").path();
            if p.is_dir() {
                todo.push(p);
            } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The file names (not paths) of the plain files directly in `dir`.
fn files_in(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_file())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_default()
}

/// A ConfigMap's `data.<key>` text.
fn configmap_file(manifest_name: &str, key: &str) -> String {
    let cm = manifest(manifest_name);
    assert_eq!(s(&cm, "kind"), "ConfigMap", "{manifest_name}");
    cm["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("{manifest_name}: no data.{key}"))
        .to_string()
}

/// The pod spec of a DaemonSet or Deployment manifest, and its one container.
fn pod_and_container(manifest_name: &str) -> (Value, Value) {
    let m = manifest(manifest_name);
    let pod = m["spec"]["template"]["spec"].clone();
    let containers = pod["containers"].as_sequence().expect("containers").clone();
    assert_eq!(containers.len(), 1, "{manifest_name}: one container");
    (pod, containers[0].clone())
}

/// The container's mount of the volume whose hostPath is `host_path`:
/// (mountPath, readOnly).
fn host_mount(pod: &Value, container: &Value, host_path: &str) -> Option<(String, bool)> {
    let volume = pod["volumes"]
        .as_sequence()?
        .iter()
        .find(|v| v["hostPath"]["path"].as_str() == Some(host_path))?;
    let name = s(volume, "name");
    let mount = container["volumeMounts"]
        .as_sequence()?
        .iter()
        .find(|m| m["name"].as_str() == Some(name))?;
    Some((
        s(mount, "mountPath").to_string(),
        mount["readOnly"].as_bool() == Some(true),
    ))
}

fn run_check_config(role: &str, file: &Path, credentials: Option<&Path>) -> (bool, String) {
    let mut cmd = Command::new(gpuops());
    cmd.arg("check-config").arg(format!("--{role}")).arg(file);
    cmd.env_remove("CREDENTIALS_DIRECTORY");
    if let Some(dir) = credentials {
        cmd.env("CREDENTIALS_DIRECTORY", dir);
    }
    let out = cmd.output().expect("run gpuops check-config");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn write_private(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

#[test]
fn every_manifest_parses_with_api_version_kind_and_name() {
    let files = yaml_files(&k8s_dir());
    assert!(files.len() >= 10, "{files:?}");
    let mut problems = Vec::new();
    for f in &files {
        let docs = documents(f);
        if docs.is_empty() {
            problems.push(format!("{}: no document", f.display()));
        }
        for d in docs {
            let kind = s(&d, "kind");
            if s(&d, "apiVersion").is_empty() || kind.is_empty() {
                problems.push(format!("{}: no apiVersion or kind", f.display()));
            }
            // A kustomization is not an object and has no name.
            if !matches!(kind, "Kustomization" | "Component")
                && s(&d["metadata"], "name").is_empty()
            {
                problems.push(format!("{}: {kind} without metadata.name", f.display()));
            }
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn kustomization_lists_every_file_in_the_directory() {
    let k = manifest("kustomization.yaml");
    assert_eq!(s(&k, "kind"), "Kustomization");
    assert_eq!(s(&k, "namespace"), "gpuops");
    let listed: BTreeSet<String> = strings(&k["resources"]).into_iter().collect();
    let mut present = files_in(&k8s_dir());
    present.remove("kustomization.yaml");
    assert_eq!(listed, present, "resources vs files in deploy/kubernetes");

    // Each component lists its own files, and is named in the comment that
    // tells how to turn it on.
    let root_text = std::fs::read_to_string(k8s_dir().join("kustomization.yaml")).unwrap();
    let components = k8s_dir().join("components");
    for e in std::fs::read_dir(&components).expect("components/") {
        let dir = e.expect("entry").path();
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let c = documents(&dir.join("kustomization.yaml")).remove(0);
        assert_eq!(s(&c, "kind"), "Component", "{name}");
        let patches: BTreeSet<String> = c["patches"]
            .as_sequence()
            .expect("patches")
            .iter()
            .map(|p| s(p, "path").to_string())
            .collect();
        let mut present = files_in(&dir);
        present.remove("kustomization.yaml");
        assert_eq!(patches, present, "component {name}");
        assert!(
            root_text.contains(&format!("components/{name}")),
            "kustomization.yaml does not mention components/{name}"
        );
    }
}

#[test]
fn agent_daemonset_has_no_token_drops_all_capabilities_and_mounts_host_roots_read_only() {
    let ds = manifest("agent-daemonset.yaml");
    assert_eq!(s(&ds, "kind"), "DaemonSet");
    let (pod, c) = pod_and_container("agent-daemonset.yaml");
    assert_eq!(pod["automountServiceAccountToken"].as_bool(), Some(false));
    assert_eq!(
        s(&pod["nodeSelector"], "nvidia.com/gpu.present"),
        "true",
        "GPU nodes only"
    );
    assert!(
        pod["tolerations"]
            .as_sequence()
            .expect("tolerations")
            .iter()
            .any(|t| s(t, "key") == "nvidia.com/gpu"),
        "tolerates the nvidia.com/gpu taint"
    );
    assert_eq!(s(&pod, "runtimeClassName"), "nvidia");
    // uid 0 for the kubelet's pod-resources socket (srwxr-xr-x root), with
    // every capability dropped below: root by uid, not by capability.
    assert_eq!(pod["securityContext"]["runAsUser"].as_u64(), Some(0));
    assert_eq!(
        pod["securityContext"]["runAsNonRoot"].as_bool(),
        Some(false)
    );

    let sc = &c["securityContext"];
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    assert!(sc["capabilities"]["add"].is_null(), "adds no capability");
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert_ne!(sc["privileged"].as_bool(), Some(true));

    // The roots the agent will use are the mount points of the host's
    // /proc, /sys and /, each read-only.
    let toml_text = configmap_file("agent-configmap.yaml", "agent.toml");
    let cfg = AgentConfig::from_str(Path::new("agent.toml"), &toml_text)
        .unwrap_or_else(|e| panic!("agent.toml: {e}"));
    for (host, root) in [
        ("/proc", &cfg.roots.procfs),
        ("/sys", &cfg.roots.sysfs),
        ("/", &cfg.roots.rootfs),
    ] {
        let (at, ro) = host_mount(&pod, &c, host).unwrap_or_else(|| panic!("no mount of {host}"));
        assert_eq!(
            Path::new(&at),
            root.as_path(),
            "the agent's root for {host}"
        );
        assert!(ro, "{host} mounted read-only");
    }
    let (at, ro) = host_mount(&pod, &c, "/var/lib/kubelet/pod-resources").expect("pod-resources");
    assert_eq!(at, "/var/lib/kubelet/pod-resources");
    assert!(ro, "pod-resources mounted read-only");
    assert!(
        host_mount(&pod, &c, "/dev/kmsg").is_none(),
        "/dev/kmsg only with components/kmsg"
    );

    // The config file the agent is given is the ConfigMap's, and the node
    // name is the pod's node.
    let args = strings(&c["args"]);
    assert_eq!(args[0], "agent");
    let config_mount = c["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| s(m, "name") == "config")
        .map(|m| s(m, "mountPath").to_string())
        .expect("config mount");
    assert!(
        args.contains(&format!("--config={config_mount}/agent.toml")),
        "{args:?}"
    );
    assert!(
        args.contains(&"--node-name=$(NODE_NAME)".to_string()),
        "{args:?}"
    );
    let node_env = c["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|e| s(e, "name") == "NODE_NAME")
        .expect("NODE_NAME");
    assert_eq!(
        s(&node_env["valueFrom"]["fieldRef"], "fieldPath"),
        "spec.nodeName"
    );

    // Port and probes: the agent's default port, /healthz and /readyz.
    assert_eq!(cfg.listen.port(), DEFAULT_AGENT_PORT);
    let port = &c["ports"][0];
    assert_eq!(
        port["containerPort"].as_u64(),
        Some(u64::from(DEFAULT_AGENT_PORT))
    );
    let port_name = s(port, "name");
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        assert_eq!(s(&c[probe]["httpGet"], "path"), path, "{probe}");
        assert_eq!(s(&c[probe]["httpGet"], "port"), port_name, "{probe}");
    }
    assert_eq!(s(&c["resources"]["requests"], "memory"), "32Mi");
    assert_eq!(s(&c["resources"]["limits"], "memory"), "64Mi");
}

#[test]
fn agent_configmap_passes_check_config() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.toml");
    std::fs::write(&file, configmap_file("agent-configmap.yaml", "agent.toml")).unwrap();
    let (ok, out) = run_check_config("agent", &file, None);
    assert!(ok, "{out}");
}

#[test]
fn service_monitor_sets_node_from_the_pods_node_name() {
    let svc = manifest("agent-service.yaml");
    let port = &svc["spec"]["ports"][0];
    assert_eq!(port["port"].as_u64(), Some(u64::from(DEFAULT_AGENT_PORT)));

    let sm = manifest("agent-servicemonitor.yaml");
    assert_eq!(s(&sm, "kind"), "ServiceMonitor");
    let selects = |m: &Value| m["app.kubernetes.io/name"].as_str().map(str::to_string);
    assert_eq!(
        selects(&sm["spec"]["selector"]["matchLabels"]),
        selects(&svc["metadata"]["labels"]),
        "the ServiceMonitor selects the agent's Service"
    );
    let endpoints = sm["spec"]["endpoints"].as_sequence().expect("endpoints");
    assert_eq!(endpoints.len(), 1);
    let ep = &endpoints[0];
    assert_eq!(s(ep, "port"), s(port, "name"));
    // The workloads' namespace/pod/container labels are the agent's series'
    // (gpu_pod_info, gpu_workload_*): the target's are renamed or dropped.
    assert_eq!(ep["honorLabels"].as_bool(), Some(true));
    let relabelings = ep["relabelings"].as_sequence().expect("relabelings");
    let dropped = relabelings
        .iter()
        .find(|r| s(r, "action") == "labeldrop")
        .map(|r| {
            s(r, "regex")
                .split('|')
                .map(str::to_string)
                .collect::<BTreeSet<_>>()
        })
        .unwrap_or_default();
    for l in ["namespace", "pod", "container"] {
        assert!(dropped.contains(l), "the target's {l} label is not dropped");
    }
    let sets_node = ep["relabelings"]
        .as_sequence()
        .expect("relabelings")
        .iter()
        .any(|r| {
            strings(&r["sourceLabels"]) == ["__meta_kubernetes_pod_node_name"]
                && s(r, "targetLabel") == "node"
                && matches!(s(r, "action"), "" | "replace")
        });
    assert!(
        sets_node,
        "no relabeling sets node from the pod's node name"
    );

    // The bot finds the agents as this job's targets, named by that label.
    let bot: toml::Value =
        toml::from_str(&configmap_file("bot-configmap.yaml", "bot.toml")).expect("bot.toml parses");
    assert_eq!(
        bot["agents"]["prometheus_job"].as_str(),
        svc["metadata"]["name"].as_str(),
        "prometheus-operator names the job after the Service"
    );
    assert_eq!(bot["agents"]["node_label"].as_str(), Some("node"));
}

#[test]
fn prometheus_rule_manifest_matches_the_rules() {
    let rule = manifest("prometheusrule.yaml");
    assert_eq!(s(&rule, "kind"), "PrometheusRule");
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("config/prometheus/rules"))
        .expect("rules dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yml"))
        .collect();
    files.sort();
    let mut groups = Vec::new();
    for f in &files {
        let doc = documents(f).remove(0);
        groups.extend(doc["groups"].as_sequence().expect("groups").iter().cloned());
    }
    assert!(!groups.is_empty());
    let in_manifest = rule["spec"]["groups"].as_sequence().expect("spec.groups");
    let names = |g: &[Value]| {
        g.iter()
            .map(|x| s(x, "name").to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        names(in_manifest),
        names(&groups),
        "run scripts/gen-prometheusrule"
    );
    for (m, r) in in_manifest.iter().zip(&groups) {
        assert!(
            m == r,
            "group {} differs from config/prometheus/rules: run scripts/gen-prometheusrule",
            s(r, "name")
        );
    }
}

#[test]
fn bot_configmap_passes_check_config_with_its_secrets() {
    let (pod, c) = pod_and_container("bot-deployment.yaml");
    let secret = manifest("bot-secret.yaml");
    assert_eq!(s(&secret, "kind"), "Secret");
    let secret_keys: BTreeSet<String> = secret["stringData"]
        .as_mapping()
        .expect("stringData")
        .keys()
        .filter_map(|k| k.as_str().map(str::to_string))
        .collect();

    // The Secret is mounted owner-only where CREDENTIALS_DIRECTORY points.
    let volume = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| s(&v["secret"], "secretName") == s(&secret["metadata"], "name"))
        .expect("the Secret's volume");
    assert_eq!(volume["secret"]["defaultMode"].as_u64(), Some(0o400));
    let mount = c["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| s(m, "name") == s(volume, "name"))
        .expect("the Secret's mount");
    assert_eq!(mount["readOnly"].as_bool(), Some(true));
    let creds = c["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|e| s(e, "name") == "CREDENTIALS_DIRECTORY")
        .expect("CREDENTIALS_DIRECTORY");
    assert_eq!(s(creds, "value"), s(mount, "mountPath"));
    assert_eq!(pod["automountServiceAccountToken"].as_bool(), Some(false));
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    assert!(pod["securityContext"]["fsGroup"].as_u64().is_some());
    assert_eq!(
        strings(&c["securityContext"]["capabilities"]["drop"]),
        ["ALL"]
    );

    // Every *_file the config names is a key of the Secret (relative, so it
    // is read from CREDENTIALS_DIRECTORY), and no secret is inline.
    let text = configmap_file("bot-configmap.yaml", "bot.toml");
    let bot: toml::Value = toml::from_str(&text).expect("bot.toml parses");
    let mut named = BTreeSet::new();
    collect_file_keys(&bot, &mut named);
    assert!(!named.is_empty());
    assert!(
        named.is_subset(&secret_keys),
        "{named:?} not all in the Secret {secret_keys:?}"
    );

    // The store is on the PVC, the port is the Service's.
    let store = bot["store"]["path"].as_str().expect("store.path");
    let data = c["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| s(m, "name") == "data")
        .expect("data mount");
    assert!(store.starts_with(s(data, "mountPath")), "{store}");
    let listen = bot["server"]["listen"].as_str().expect("server.listen");
    assert!(
        listen.ends_with(&format!(":{DEFAULT_BOT_PORT}")),
        "{listen}"
    );
    let svc = manifest("bot-service.yaml");
    assert_eq!(
        svc["spec"]["ports"][0]["port"].as_u64(),
        Some(u64::from(DEFAULT_BOT_PORT))
    );
    let runbooks = bot["runbooks"]["dir"].as_str().expect("runbooks.dir");

    // check-config, with the Secret's keys as 0600 files in a temporary
    // CREDENTIALS_DIRECTORY, and the image's paths moved into the temp dir.
    let dir = tempfile::tempdir().unwrap();
    let creds_dir = dir.path().join("secrets");
    std::fs::create_dir(&creds_dir).unwrap();
    let state_dir = dir.path().join("data");
    std::fs::create_dir(&state_dir).unwrap();
    let text = text
        .replace(runbooks, &repo().join("runbooks").display().to_string())
        .replace(s(data, "mountPath"), &state_dir.display().to_string());
    let file = dir.path().join("bot.toml");
    write_private(&file, &text);
    let (ok, out) = run_check_config("bot", &file, Some(&creds_dir));
    assert!(!ok, "passes without its secrets: {out}");
    for k in &secret_keys {
        write_private(&creds_dir.join(k), &format!("test-{k}\n"));
    }
    let (ok, out) = run_check_config("bot", &file, Some(&creds_dir));
    assert!(ok, "{out}");
}

/// The values of every `*_file` key (secrets read from files) in a TOML tree.
fn collect_file_keys(v: &toml::Value, out: &mut BTreeSet<String>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                if k.ends_with("_file") {
                    if let Some(name) = v.as_str() {
                        out.insert(name.to_string());
                    }
                } else {
                    collect_file_keys(v, out);
                }
            }
        }
        toml::Value::Array(a) => a.iter().for_each(|x| collect_file_keys(x, out)),
        _ => {}
    }
}

#[test]
fn bot_deployment_is_one_replica_on_its_volume() {
    let d = manifest("bot-deployment.yaml");
    assert_eq!(s(&d, "kind"), "Deployment");
    assert_eq!(
        d["spec"]["replicas"].as_u64(),
        Some(1),
        "SQLite: one replica"
    );
    assert_eq!(s(&d["spec"]["strategy"], "type"), "Recreate");
    let (pod, _) = pod_and_container("bot-deployment.yaml");
    let pvc = manifest("bot-pvc.yaml");
    assert!(
        pod["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|v| s(&v["persistentVolumeClaim"], "claimName") == s(&pvc["metadata"], "name")),
        "the store's PVC is mounted"
    );
}

#[test]
fn kmsg_component_mounts_the_kernel_log_where_the_agent_reads_it() {
    let patch = documents(&k8s_dir().join("components/kmsg/agent-kmsg.yaml")).remove(0);
    assert_eq!(s(&patch, "kind"), "DaemonSet");
    assert_eq!(
        s(&patch["metadata"], "name"),
        s(&manifest("agent-daemonset.yaml")["metadata"], "name")
    );
    let pod = &patch["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(s(c, "name"), "agent");
    let toml_text = configmap_file("agent-configmap.yaml", "agent.toml");
    let cfg = AgentConfig::from_str(Path::new("agent.toml"), &toml_text)
        .unwrap_or_else(|e| panic!("agent.toml: {e}"));
    let (at, ro) = host_mount(pod, c, "/dev/kmsg").expect("the component mounts /dev/kmsg");
    assert_eq!(Path::new(&at), cfg.roots.kmsg.as_path());
    assert!(ro, "/dev/kmsg mounted read-only");
}

/// `kubectl kustomize` (kustomize built into kubectl; no cluster needed) on
/// `dir`: the rendered objects.
fn kustomize(dir: &Path) -> Vec<Value> {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .expect("needs kubectl on PATH (kubectl kustomize)");
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    serde_norway::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).expect("rendered YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

#[test]
#[ignore = "needs kubectl: run by .ci/run"]
fn kustomize_renders_the_manifests_and_the_kmsg_component() {
    let objects = kustomize(&k8s_dir());
    let resources = strings(&manifest("kustomization.yaml")["resources"]);
    assert_eq!(objects.len(), resources.len(), "one object per resource");
    for o in &objects {
        if s(o, "kind") != "Namespace" {
            assert_eq!(s(&o["metadata"], "namespace"), "gpuops", "{o:?}");
        }
        if let Some(containers) = o["spec"]["template"]["spec"]["containers"].as_sequence() {
            for c in containers {
                assert!(
                    !s(c, "image").starts_with("ghcr.io/gpuops/"),
                    "images: not applied to {}",
                    s(&o["metadata"], "name")
                );
            }
        }
    }

    // The component, turned on as the kustomization's comment says.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("kubernetes");
    let status = Command::new("cp")
        .arg("-r")
        .arg(k8s_dir())
        .arg(&copy)
        .status()
        .expect("cp");
    assert!(status.success());
    let k = copy.join("kustomization.yaml");
    let text = std::fs::read_to_string(&k).unwrap();
    let on = text
        .replace("# components:\n", "components:\n")
        .replace("#   - components/kmsg\n", "  - components/kmsg\n");
    assert_ne!(
        on, text,
        "the kustomization's comment names components/kmsg"
    );
    std::fs::write(&k, on).unwrap();
    let ds = kustomize(&copy)
        .into_iter()
        .find(|o| s(o, "kind") == "DaemonSet")
        .expect("DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let (at, _) = host_mount(pod, c, "/dev/kmsg").expect("/dev/kmsg mounted");
    assert_eq!(at, "/dev/kmsg");
    assert!(
        host_mount(pod, c, "/proc").is_some(),
        "the patch merges into the DaemonSet"
    );
}

/// The kinds `kubernetes-validate` has schemas for: the built-in ones. The
/// prometheus-operator kinds (ServiceMonitor, PrometheusRule) and the
/// Kustomization are checked by the tests above and by `kubectl kustomize`.
fn built_in_manifests() -> Vec<PathBuf> {
    yaml_files(&k8s_dir())
        .into_iter()
        .filter(|p| !p.components().any(|c| c.as_os_str() == "components"))
        .filter(|p| {
            documents(p).iter().all(|d| {
                let api = s(d, "apiVersion");
                !api.starts_with("monitoring.coreos.com/") && !api.starts_with("kustomize.")
            })
        })
        .collect()
}

/// `kubernetes-validate --strict -k <version> <files>`: (success, output).
fn kubernetes_validate(version: &str, files: &[PathBuf]) -> (bool, String) {
    let out = Command::new("kubernetes-validate")
        .args(["--strict", "-k", version])
        .args(files)
        .output()
        .expect("kubernetes-validate (pip install kubernetes-validate; .ci/run does)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Issue 25: the manifests validate offline against the Kubernetes schemas,
/// strictly (no unknown field), for 1.28 (the first release with the
/// pod-resources `List` GA) and the validator's newest.
#[test]
#[ignore = "needs kubernetes-validate (pip): run by .ci/run"]
fn manifests_validate_strictly_against_the_kubernetes_schemas() {
    let files = built_in_manifests();
    assert!(
        files.len() >= 9,
        "the built-in objects: {files:?} (namespace, agent ×3, bot ×5)"
    );
    for version in ["1.28.0", "1.33.0"] {
        let (ok, out) = kubernetes_validate(version, &files);
        assert!(ok, "kubernetes {version}:\n{out}");
        for f in &files {
            let name = f.display().to_string();
            assert!(
                out.lines()
                    .any(|l| l.contains(&name) && l.contains("passed")),
                "kubernetes {version}: no pass for {name}:\n{out}"
            );
        }
    }

    // The validator is strict: a field the schema lacks fails it.
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("agent-daemonset.yaml");
    let text = std::fs::read_to_string(k8s_dir().join("agent-daemonset.yaml")).expect("daemonset");
    let text = text.replacen(
        "      hostPID: true\n",
        "      hostPID: true\n      hostPIDs: true\n",
        1,
    );
    assert!(text.contains("hostPIDs"), "the DaemonSet sets hostPID");
    std::fs::write(&bad, text).expect("write");
    let (ok, out) = kubernetes_validate("1.28.0", &[bad]);
    assert!(!ok, "an unknown field passed strict validation:\n{out}");
}
