//! Every shipped runbook validates, dry-runs, and keeps the safety rules:
//! mitigations need approval, privileged argv shapes are the ones listed in
//! runbooks/README.md (the sudoers allowlist is built from that list).
// Integration tests run the real binary; only the product is held to the
// no-spawn-outside-exec.rs rule.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use gpuops::runbook::engine::{self, Rendered};
use gpuops::runbook::{Action, Phase, RunbookSet, Target};

const IDS: &[&str] = &[
    "agent-down",
    "cpu-saturation",
    "gpu-ecc-remap",
    "gpu-fell-off-bus",
    "gpu-nvlink",
    "gpu-throttle",
    "gpu-underutilized",
    "gpu-xid",
    "memory-pressure",
    "oom-kill",
    "storage",
];

/// Alert labels a real alert would carry, enough to fill every parameter.
fn sample_labels() -> BTreeMap<String, String> {
    [
        ("alertname", "GpuXidError"),
        ("instance", "gpu-node-07.dc1.example:9949"),
        ("job", "gpuops-agent"),
        ("gpu", "3"),
        ("xid", "48"),
        ("mountpoint", "/scratch"),
        ("device", "nvme0n1"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn shipped() -> RunbookSet {
    let (set, errors) = RunbookSet::load_dir(Path::new("runbooks"));
    assert!(errors.0.is_empty(), "shipped runbooks invalid:\n{errors}");
    set
}

#[test]
fn every_shipped_runbook_validates_and_plans() {
    let set = shipped();
    let ids: Vec<&str> = set.runbooks.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, IDS);
    for rb in &set.runbooks {
        let plan = engine::plan(rb, &BTreeMap::new(), &sample_labels())
            .unwrap_or_else(|e| panic!("{}: {e}", rb.id));
        assert!(!rb.triggers.is_empty(), "{}: no triggers", rb.id);
        assert!(
            rb.steps.iter().any(|s| s.phase == Phase::Investigate),
            "{}: no investigate step",
            rb.id
        );
        assert!(
            rb.steps.iter().any(|s| s.phase == Phase::Escalate),
            "{}: no escalate step",
            rb.id
        );
        for s in &plan.steps {
            if s.step.phase == Phase::Mitigate {
                assert!(
                    s.step.needs_approval,
                    "{}: mitigation {} must need approval",
                    rb.id, s.step.name
                );
            }
            if let Rendered::Command { argv } = &s.rendered {
                assert!(
                    argv.iter().all(|a| !a.contains("{{")),
                    "{}: {argv:?}",
                    rb.id
                );
                if argv[0] == "sudo" {
                    assert_eq!(argv[1], "-n", "{}: sudo must be non-interactive", rb.id);
                    assert!(
                        s.step.needs_approval,
                        "{}: privileged step {} must need approval",
                        rb.id, s.step.name
                    );
                    assert_eq!(s.step.target, Target::Node);
                }
            }
        }
    }
}

#[test]
fn alerts_suggest_the_right_runbooks() {
    let set = shipped();
    let check = |labels: &[(&str, &str)], expect: &[&str]| {
        let labels: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let got: Vec<&str> = set.suggest(&labels).iter().map(|r| r.id.as_str()).collect();
        assert_eq!(got, expect, "{labels:?}");
    };
    check(&[("alertname", "GpuXidError"), ("xid", "13")], &["gpu-xid"]);
    check(
        &[("alertname", "GpuXidError"), ("xid", "79")],
        &["gpu-fell-off-bus", "gpu-xid"],
    );
    check(&[("alertname", "GpuFellOffBus")], &["gpu-fell-off-bus"]);
    check(&[("alertname", "OomKill")], &["oom-kill"]);
    check(
        &[("alertname", "TargetDown"), ("job", "gpuops-agent")],
        &["agent-down"],
    );
    check(&[("alertname", "TargetDown"), ("job", "node")], &[]);
    check(&[("alertname", "StorageReadOnly")], &["storage"]);
    check(&[("alertname", "SomethingElse")], &[]);
}

/// The privileged argv shapes listed in runbooks/README.md, one per line
/// between the markers, with `<param>` for parameters.
fn readme_shapes() -> Vec<String> {
    let text = std::fs::read_to_string("runbooks/README.md").expect("runbooks/README.md");
    let start = text
        .find("BEGIN PRIVILEGED ARGV")
        .expect("BEGIN PRIVILEGED ARGV marker");
    let end = text.find("END PRIVILEGED ARGV").expect("END marker");
    text[start..end]
        .lines()
        .skip(1)
        .map(str::trim)
        .filter(|l| l.starts_with("sudo -n "))
        .map(str::to_string)
        .collect()
}

#[test]
fn privileged_argv_shapes_are_listed_in_the_readme() {
    let shapes = readme_shapes();
    let mut used = Vec::new();
    for rb in &shipped().runbooks {
        for s in &rb.steps {
            let Action::Command { argv } = &s.action else {
                continue;
            };
            let words: Vec<String> = argv
                .iter()
                .map(|t| {
                    let mut w = t.source();
                    for p in t.params() {
                        w = w.replace(&format!("{{{{{p}}}}}"), &format!("<{p}>"));
                    }
                    w
                })
                .collect();
            if words[0] != "sudo" {
                continue;
            }
            let line = words.join(" ");
            assert!(
                shapes.contains(&line),
                "{}: step {} runs `{line}` as root but runbooks/README.md does not list it",
                rb.id,
                s.name
            );
            used.push(line);
        }
    }
    for s in &shapes {
        assert!(
            used.contains(s),
            "README lists `{s}` but no runbook uses it"
        );
    }
}

#[test]
fn cli_checks_lists_and_dry_runs_every_shipped_runbook() {
    let bin = env!("CARGO_BIN_EXE_gpuops");
    let out = Command::new(bin)
        .args(["runbook", "check", "runbooks"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "runbooks: 11 runbooks ok, 94 steps\n"
    );

    let out = Command::new(bin)
        .args(["runbook", "list", "--dir", "runbooks"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().count(), IDS.len());
    assert!(text.contains("gpu-xid            GPU XID error  [{alertname=~"));

    let set = shipped();
    for id in IDS {
        let rb = set.get(id).unwrap();
        let mut cmd = Command::new(bin);
        cmd.args(["runbook", "run", id, "--dir", "runbooks", "--dry-run"]);
        for (k, v) in [
            ("instance", "gpu-node-07:9949"),
            ("gpu", "3"),
            ("xid", "48"),
            ("mountpoint", "/scratch"),
        ] {
            if rb.param(k).is_some() {
                cmd.args(["--param", &format!("{k}={v}")]);
            }
        }
        let out = cmd.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{id}: {}{stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.ends_with("dry run: nothing was run\n"), "{stdout}");
        let steps = rb.steps.len();
        assert!(stdout.contains(&format!("[{steps}/{steps}] ")), "{stdout}");
    }
}

#[test]
fn dry_run_shows_rendered_argv() {
    let out = Command::new(env!("CARGO_BIN_EXE_gpuops"))
        .args([
            "runbook",
            "run",
            "gpu-ecc-remap",
            "--dir",
            "runbooks",
            "--dry-run",
            "-p",
            "gpu=5",
            "-p",
            "instance=gpu-node-07.dc1:9949",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    expect_test::expect![[r#"
        runbook gpu-ecc-remap: GPU ECC errors, row remap pending or failed
          alertname=manual
          gpu=5
          instance=gpu-node-07.dc1:9949
          node=gpu-node-07
        [1/9] investigate ecc-state (node command, 30s)
            nvidia-smi -q -d ECC,PAGE_RETIREMENT,ROW_REMAPPER -i 5
        [2/9] investigate remap-counters (node command, 30s)
            nvidia-smi --query-remapped-rows=gpu_bus_id,remapped_rows.correctable,remapped_rows.uncorrectable,remapped_rows.pending,remapped_rows.failure --format=csv -i 5
        [3/9] investigate kernel-log (node command, 30s)
            journalctl -k --since -24h --no-pager --grep 'NVRM: Xid.*: (48|63|64|92|94|95),'
        [4/9] investigate ecc-trend (bot promql, 15s)
            promql: gpu_remapped_rows{instance="gpu-node-07.dc1:9949"} > 0 or increase(gpu_ecc_errors_total{instance="gpu-node-07.dc1:9949",type="uncorrected"}[24h]) > 0
        [5/9] investigate gpu-processes (node command, 30s)
            nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv -i 5
        [6/9] mitigate drain-slurm (node command, 30s, needs approval)
            sudo -n scontrol update nodename=gpu-node-07 state=drain 'reason=gpuops: manual'
        [7/9] mitigate cordon-kubernetes (bot command, 30s, needs approval)
            kubectl --kubeconfig /etc/gpuops/kubeconfig cordon gpu-node-07
        [8/9] mitigate gpu-reset (node command, 2m, needs approval)
            sudo -n nvidia-smi -r -i 5
        [9/9] escalate escalate (bot command, 5s)
            echo 'If GPU 5 on gpu-node-07 shows remapped_rows.failure > 0, uncorrectable remaps that keep growing after a reset, or XID 48/94/95 again within a week: keep the node drained and file an RMA with the vendor (attach nvidia-bug-report). Page the hardware on-call only if several GPUs or nodes are affected at once; otherwise a ticket within one business day.'
        dry run: nothing was run
    "#]]
    .assert_eq(&stdout);
}

#[test]
fn run_refuses_a_parameter_failing_its_pattern() {
    let out = Command::new(env!("CARGO_BIN_EXE_gpuops"))
        .args([
            "runbook",
            "run",
            "storage",
            "--dir",
            "runbooks",
            "--dry-run",
            "-p",
            "mountpoint=/scratch; rm -rf /",
            "-p",
            "instance=n1:9949",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "gpuops: runbook storage: refused: parameter mountpoint: \"/scratch; rm -rf /\" does not match pattern /[A-Za-z0-9._/@+:~=-]{0,200} (given)\n"
    );
    assert!(
        out.stdout.is_empty(),
        "nothing printed or run before the refusal"
    );
}

#[test]
fn non_tty_run_without_yes_refuses_approval_steps_and_runs_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("local.yaml"),
        r#"
id: local
title: Local test
steps:
  - name: hello
    phase: investigate
    kind: command
    target: node
    run: [echo, hello]
  - name: guarded
    phase: mitigate
    kind: command
    target: node
    needs_approval: true
    run: [echo, mitigated]
  - name: q
    phase: investigate
    kind: promql
    query: up
"#,
    )
    .unwrap();
    let run = |yes: bool| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_gpuops"));
        cmd.args(["runbook", "run", "local", "--dir"])
            .arg(dir.path())
            .env_remove("GPUOPS_PROMETHEUS_URL")
            .stdin(std::process::Stdio::null());
        if yes {
            cmd.arg("--yes");
        }
        cmd.output().unwrap()
    };
    let out = run(false);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(stdout.contains("    | hello\n"), "{stdout}");
    assert!(
        stdout.contains("refused: needs approval; not a terminal and --yes not given"),
        "{stdout}"
    );
    assert!(!stdout.contains("| mitigated"), "{stdout}");
    assert!(
        stdout.contains("skipped: no Prometheus URL (set GPUOPS_PROMETHEUS_URL"),
        "{stdout}"
    );
    let out = run(true);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("    | mitigated\n"), "{stdout}");
}

#[tokio::test]
async fn every_shipped_runbook_dry_runs_through_the_engine() {
    use gpuops::runbook::engine::{DryRunExecutor, StepExecutor as _, StepStatus};
    for rb in &shipped().runbooks {
        let plan = engine::plan(rb, &BTreeMap::new(), &sample_labels()).unwrap();
        let dry = DryRunExecutor::new();
        for s in &plan.steps {
            let out = dry.execute(&plan, s).await;
            assert_eq!(out.status, StepStatus::Skipped);
            assert!(
                out.output.starts_with("dry run: would run "),
                "{}",
                out.output
            );
        }
        let names: Vec<String> = dry.seen().into_iter().map(|(n, _)| n).collect();
        let want: Vec<String> = rb.steps.iter().map(|s| s.name.clone()).collect();
        assert_eq!(names, want, "{}", rb.id);
    }
}

/// Every alert in the shipped Prometheus rules is answered by the runbook its
/// `runbook` annotation names (the triggers match its name and labels), and
/// that runbook plans from the labels such an alert carries.
#[test]
fn shipped_alert_rules_suggest_their_annotated_runbook() {
    let text = std::fs::read_to_string("config/prometheus/rules/gpuops-alerts.yml")
        .expect("config/prometheus/rules/gpuops-alerts.yml");
    let doc: serde_norway::Value = serde_norway::from_str(&text).unwrap();
    let set = shipped();
    let mut checked = 0;
    for group in doc["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            let Some(alert) = rule["alert"].as_str() else {
                continue;
            };
            let Some(want) = rule["annotations"]["runbook"].as_str() else {
                continue;
            };
            let expr = rule["expr"].as_str().unwrap_or("");
            // The labels the alert's series carry, roughly read from its expression.
            let mut labels: BTreeMap<String, String> = [
                ("alertname", alert),
                ("job", "gpuops-agent"),
                ("instance", "gpu-node-07:9949"),
                (
                    "severity",
                    rule["labels"]["severity"].as_str().unwrap_or(""),
                ),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
            let mut add = |pairs: &[(&str, &str)]| {
                for (k, v) in pairs {
                    labels.insert(k.to_string(), v.to_string());
                }
            };
            let per_gpu =
                expr.contains("gpu_") && !expr.contains("avg by") && !expr.contains("gpu_devices");
            if per_gpu {
                add(&[
                    ("gpu", "2"),
                    ("uuid", "GPU-1234"),
                    ("pci_bus_id", "00000000:3B:00.0"),
                ]);
            }
            if expr.contains("gpu_xid_errors_total") {
                add(&[("xid", "48")]);
            }
            if expr.contains("storage_") && !expr.contains("storage_errors_total") {
                add(&[
                    ("mountpoint", "/scratch"),
                    ("device", "nvme0n1"),
                    ("fstype", "xfs"),
                ]);
            }
            if expr.contains("storage_errors_total") {
                add(&[("device", "sda"), ("source", "kmsg")]);
            }
            let suggested: Vec<&str> = set.suggest(&labels).iter().map(|r| r.id.as_str()).collect();
            assert!(
                suggested.contains(&want),
                "alert {alert} names runbook {want}, but its triggers do not match {labels:?} (suggested {suggested:?})"
            );
            let rb = set.get(want).unwrap();
            engine::plan(rb, &BTreeMap::new(), &labels)
                .unwrap_or_else(|e| panic!("alert {alert} -> runbook {want}: {e}"));
            checked += 1;
        }
    }
    assert!(checked >= 20, "only {checked} alerts checked");
}
