//! Checks the shipped operations files (Prometheus rules, AlertManager config)
//! against the agent's metric contract, and runs the tools operators trust on
//! them (promtool, amtool). Reads files only; never changes them.
#![allow(clippy::disallowed_methods)] // integration tests spawn the real binary and external tools

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use serde_norway::Value;

use crate::ops_support;
use ops_support::{contract_metrics, repo, series_names};

const SEVERITIES: &[&str] = &["critical", "high", "warning", "info"];
const COMPONENTS: &[&str] = &["gpu", "cpu", "memory", "storage", "agent"];

/// Runbook ids: the file stems of `runbooks/*.yaml`.
fn runbook_ids() -> BTreeSet<String> {
    std::fs::read_dir(repo().join("runbooks"))
        .expect("runbooks/")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|n| n.strip_suffix(".yaml").map(str::to_string))
        .collect()
}

fn load_yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// (group, rule) for every rule of a rule file.
fn rules(path: &Path) -> Vec<Value> {
    let doc = load_yaml(path);
    let mut out = Vec::new();
    for g in doc["groups"].as_sequence().expect("groups") {
        for r in g["rules"].as_sequence().expect("rules") {
            out.push(r.clone());
        }
    }
    out
}

fn s<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(|x| x.as_str())
}

fn alert_rules() -> Vec<Value> {
    rules(&repo().join("config/prometheus/rules/gpuops-alerts.yml"))
}

fn recording_rules() -> Vec<Value> {
    rules(&repo().join("config/prometheus/rules/gpuops-recording.yml"))
}

#[test]
fn alerts_carry_severity_component_and_a_known_runbook() {
    let mut problems = Vec::new();
    let runbook_ids = runbook_ids();
    let alerts = alert_rules();
    for r in &alerts {
        let name = s(r, "alert").expect("alert name");
        let labels = &r["labels"];
        let ann = &r["annotations"];
        match s(labels, "severity") {
            Some(sev) if SEVERITIES.contains(&sev) => {}
            other => problems.push(format!("{name}: severity {other:?}")),
        }
        match s(labels, "component") {
            Some(c) if COMPONENTS.contains(&c) => {}
            other => problems.push(format!("{name}: component {other:?}")),
        }
        for key in ["summary", "description"] {
            if s(ann, key).is_none_or(|t| t.trim().is_empty()) {
                problems.push(format!("{name}: no {key} annotation"));
            }
        }
        match s(ann, "runbook") {
            Some(id) if runbook_ids.contains(id) => {}
            other => problems.push(format!(
                "{name}: runbook {other:?} is not a file in runbooks/"
            )),
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
    let names: BTreeSet<&str> = alerts.iter().filter_map(|r| s(r, "alert")).collect();
    assert!(names.len() >= 12, "only {} alerts", names.len());
    for required in [
        "GPUUtilizationLow",
        "StorageApproachingLimit",
        "GPUFellOffBus",
        "GPUDown",
        "GPUCriticalXID",
        "GPUUncorrectableECC",
        "GPURowRemapPending",
        "GPURowRemapFailure",
        "GPUThermalThrottling",
        "GPUTemperatureHigh",
        "GPUNVLinkErrors",
        "OOMKill",
        "MemoryPressure",
        "MemoryUtilizationHigh",
        "CPUUtilizationHigh",
        "StorageErrors",
        "StorageReadOnly",
        "StorageMountStuck",
        "AgentDown",
        "CollectorFailing",
    ] {
        assert!(names.contains(required), "{required} missing");
    }
}

#[test]
fn platform_rules_keep_their_thresholds() {
    let alerts = alert_rules();
    let find = |name: &str| {
        alerts
            .iter()
            .find(|r| s(r, "alert") == Some(name))
            .unwrap_or_else(|| panic!("{name} missing"))
            .clone()
    };
    let low = find("GPUUtilizationLow");
    assert_eq!(
        s(&low, "expr"),
        Some("avg by (instance, job) (gpu_utilization_percent) < 30")
    );
    assert_eq!(s(&low, "for"), Some("30m"));
    assert_eq!(s(&low["labels"], "severity"), Some("high"));
    let storage = find("StorageApproachingLimit");
    assert_eq!(
        s(&storage, "expr"),
        Some("storage_used_bytes / storage_total_bytes > 0.8")
    );
    assert_eq!(s(&storage, "for"), Some("1h"));
    assert_eq!(s(&storage["labels"], "severity"), Some("warning"));
}

#[test]
fn rules_read_only_contract_series() {
    let recorded: BTreeSet<String> = recording_rules()
        .iter()
        .filter_map(|r| s(r, "record").map(str::to_string))
        .collect();
    let contract = contract_metrics();
    let mut unknown = Vec::new();
    for r in alert_rules().iter().chain(recording_rules().iter()) {
        let name = s(r, "alert").or(s(r, "record")).unwrap_or("?");
        let expr = s(r, "expr").expect("expr");
        for series in series_names(expr) {
            if !contract.contains(&series) && !recorded.contains(&series) {
                unknown.push(format!("{name}: {series}"));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "series outside the contract: {unknown:#?}"
    );
}

#[test]
fn series_names_ignores_labels_grouping_and_functions() {
    let check = |expr: &str, expect: &[&str]| {
        let got: Vec<String> = series_names(expr).into_iter().collect();
        assert_eq!(got, expect, "{expr}");
    };
    check(
        r#"sum by (instance, gpu) (increase(gpu_errors_total{type="xid_critical"}[15m])) > 0"#,
        &["gpu_errors_total"],
    );
    check(
        r#"(x_total unless x_total offset 15m) > 0 or up{job="a"} == 0"#,
        &["up", "x_total"],
    );
    check(
        "1 - memory_available_bytes / memory_total_bytes",
        &["memory_available_bytes", "memory_total_bytes"],
    );
}

// ---- the tools operators trust -------------------------------------------

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd} {args:?} failed:\n{text}");
    text
}

#[test]
#[ignore = "needs promtool; run by .ci/run"]
fn promtool_checks_and_unit_tests_pass() {
    run(
        "promtool",
        &[
            "check",
            "rules",
            "config/prometheus/rules/gpuops-alerts.yml",
            "config/prometheus/rules/gpuops-recording.yml",
        ],
    );
    run(
        "promtool",
        &[
            "test",
            "rules",
            "config/prometheus/tests/gpuops-alerts.test.yml",
            "config/prometheus/tests/gpuops-recording.test.yml",
        ],
    );
    run(
        "promtool",
        &["check", "config", "config/prometheus/prometheus.yml"],
    );
}

#[test]
fn promtool_tests_cover_every_alert_firing_and_quiet() {
    let doc = load_yaml(&repo().join("config/prometheus/tests/gpuops-alerts.test.yml"));
    let mut fired = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    for t in doc["tests"].as_sequence().expect("tests") {
        for c in t["alert_rule_test"].as_sequence().into_iter().flatten() {
            let name = s(c, "alertname").expect("alertname").to_string();
            let empty = c["exp_alerts"].as_sequence().is_none_or(|a| a.is_empty());
            if empty {
                quiet.insert(name);
            } else {
                fired.insert(name);
            }
        }
    }
    let mut missing = Vec::new();
    for r in alert_rules() {
        let name = s(&r, "alert").expect("alert").to_string();
        if !fired.contains(&name) {
            missing.push(format!("{name}: no firing case"));
        }
        if !quiet.contains(&name) {
            missing.push(format!("{name}: no quiet case"));
        }
    }
    assert!(missing.is_empty(), "{missing:#?}");
}

#[test]
#[ignore = "needs amtool; run by .ci/run"]
fn amtool_accepts_config_and_routes_every_severity_to_the_bot() {
    let cfg = "config/alertmanager/alertmanager.yml";
    let out = run("amtool", &["check-config", cfg]);
    assert!(out.contains("SUCCESS"), "{out}");
    for sev in ["critical", "high", "warning", "info", "P1", ""] {
        let label = format!("severity={sev}");
        let out = run(
            "amtool",
            &[
                "config",
                "routes",
                "test",
                "--config.file",
                cfg,
                "--verify.receivers=gpuops-bot",
                &label,
                "alertname=GPUDown",
            ],
        );
        assert!(out.contains("gpuops-bot"), "{sev}: {out}");
    }
}

#[test]
fn alertmanager_config_sends_resolved_with_bearer_to_the_bot() {
    let doc = load_yaml(&repo().join("config/alertmanager/alertmanager.yml"));
    let hooks = doc["receivers"][0]["webhook_configs"]
        .as_sequence()
        .expect("webhook_configs");
    assert_eq!(hooks.len(), 1);
    let hook = &hooks[0];
    assert_eq!(s(hook, "url"), Some("http://127.0.0.1:9950/alertmanager"));
    assert_eq!(hook["send_resolved"].as_bool(), Some(true));
    let auth = &hook["http_config"]["authorization"];
    assert_eq!(s(auth, "type"), Some("Bearer"));
    assert!(s(auth, "credentials_file").is_some());
    let group_by: Vec<&str> = doc["route"]["group_by"]
        .as_sequence()
        .expect("group_by")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(group_by, ["alertname", "instance"]);
}

/// Every PromQL query in the shipped runbooks names only series the agent
/// exports (docs/metrics.md) or Prometheus' own `up`.
#[test]
fn runbook_queries_read_only_contract_series() {
    use gpuops::runbook::{Action, RunbookSet};
    let (set, errors) = RunbookSet::load_dir(&repo().join("runbooks"));
    assert!(errors.0.is_empty(), "{errors}");
    let contract = contract_metrics();
    let mut unknown = Vec::new();
    let mut queries = 0;
    for rb in &set.runbooks {
        for s in &rb.steps {
            let Action::Promql { query, .. } = &s.action else {
                continue;
            };
            queries += 1;
            let expr = query.source().replace("{{", "").replace("}}", "");
            let names = series_names(&expr);
            assert!(
                !names.is_empty(),
                "{}/{}: no series in {expr}",
                rb.id,
                s.name
            );
            for series in names {
                if !contract.contains(&series) {
                    unknown.push(format!("{}/{}: {series}", rb.id, s.name));
                }
            }
        }
    }
    assert!(queries >= 15, "only {queries} queries");
    assert!(
        unknown.is_empty(),
        "series the agent does not export: {unknown:#?}"
    );
}

/// Every metric the XID catalogue's meanings and actions tell an operator to
/// look at is one the agent exports.
#[test]
fn xid_catalogue_names_only_contract_series() {
    let contract = contract_metrics();
    let metric =
        regex::Regex::new(r"\b(?:gpu|gpuops|storage|memory|cpu|oom)_[a-z0-9_]+\b").unwrap();
    let mut named = 0;
    let mut unknown = Vec::new();
    for x in gpuops::gpu::xid::catalogue() {
        for text in [x.meaning, x.action] {
            for m in metric.find_iter(text) {
                named += 1;
                if !contract.contains(m.as_str()) {
                    unknown.push(format!("xid {}: {}", x.code, m.as_str()));
                }
            }
        }
    }
    assert!(named >= 5, "only {named} metric names in the catalogue");
    assert!(unknown.is_empty(), "{unknown:#?}");
}

/// Issue 22, observation 9: the README's `gpuops keygen --out /root/gpuops-keys`
/// failed when the directory did not exist; it is created, 0700.
#[test]
fn keygen_out_creates_the_directory_0700() {
    use std::os::unix::fs::PermissionsExt as _;
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("gpuops-keys");
    let out = Command::new(env!("CARGO_BIN_EXE_gpuops"))
        .args(["keygen", "--out"])
        .arg(&out_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&out_dir), 0o700);
    assert_eq!(mode(&out_dir.join("exec.key")), 0o600);
    assert_eq!(mode(&out_dir.join("exec.pub")), 0o644);
}

/// Issue 22, observation 9: plain `gpuops keygen` wrote the private key into
/// the current directory, a git work tree where nothing ignores it.
#[test]
fn keygen_refuses_to_write_the_private_key_into_a_git_work_tree() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("checkout");
    std::fs::create_dir_all(tree.join(".git")).unwrap();
    std::fs::create_dir_all(tree.join("src")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_gpuops"))
        .arg("keygen")
        .current_dir(tree.join("src"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("git work tree"), "{stderr}");
    assert!(!tree.join("src/exec.key").exists());
    // Nor with --out into a directory of it that does not exist yet.
    let out = Command::new(env!("CARGO_BIN_EXE_gpuops"))
        .args(["keygen", "--out"])
        .arg(tree.join("keys"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    assert!(!tree.join("keys").exists());
}
