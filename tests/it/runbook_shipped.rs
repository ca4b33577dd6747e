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
use gpuops::runbook::{Action, Phase, RunbookSet, StepTarget};

const IDS: &[&str] = &[
    "agent-down",
    "cpu-saturation",
    "gpu-ecc-remap",
    "gpu-fell-off-bus",
    "gpu-nvlink",
    "gpu-reset",
    "gpu-throttle",
    "gpu-underutilized",
    "gpu-xid",
    "memory-pressure",
    "node-out-of-service",
    "oom-kill",
    "storage",
    "storage-mount-stuck",
];

/// Alert labels a real alert would carry, enough to fill every parameter.
fn sample_labels() -> BTreeMap<String, String> {
    [
        ("alertname", "GpuXidError"),
        ("instance", "gpu-node-07.dc1.example:9949"),
        ("node", "gpu-node-07"),
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
            if s.step.phase == Phase::Mitigate && !is_read_only_verification(s) {
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
                    assert_eq!(s.step.target, StepTarget::Node);
                }
            }
        }
    }
}

/// A `verify-*` step in the mitigate phase (so that its failure stops the
/// return to service) that only reads: unprivileged nvidia-smi without a
/// reset, or DCGM diagnostics. Those need no approval. Nor does a PromQL
/// check in the mitigate phase (gpu-xid's `remap-failed`, whose failure
/// keeps the GPU out of service): a query reads Prometheus, nothing more.
fn is_read_only_verification(s: &engine::PlannedStep) -> bool {
    if let Rendered::Promql { .. } = s.rendered {
        return true;
    }
    let Rendered::Command { argv } = &s.rendered else {
        return false;
    };
    let read_only = match argv[0].as_str() {
        "nvidia-smi" => !argv.iter().any(|a| {
            a == "-r"
                || a.starts_with("--gpu-reset")
                || a.starts_with("-pm")
                || a.starts_with("-mig")
                || a.starts_with("-c")
                || a.starts_with("-pl")
        }),
        "dcgmi" => argv.get(1).map(String::as_str) == Some("diag"),
        _ => false,
    };
    s.step.name.starts_with("verify-") && s.step.target == StepTarget::Node && read_only
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
        &["gpu-fell-off-bus"],
    );
    check(&[("alertname", "GPUXIDError"), ("xid", "63")], &["gpu-xid"]);
    check(
        &[("alertname", "GPUCriticalXID"), ("xid", "119")],
        &["gpu-reset"],
    );
    check(
        &[("alertname", "GPUXIDMemoryError"), ("xid", "48")],
        &["gpu-ecc-remap"],
    );
    check(
        &[("alertname", "GPUXIDNVLinkError"), ("xid", "145")],
        &["gpu-nvlink"],
    );
    // An XID alert without its code: investigation only.
    check(&[("alertname", "GPUCriticalXID")], &["gpu-xid"]);
    check(&[("alertname", "GpuFellOffBus")], &["gpu-fell-off-bus"]);
    check(&[("alertname", "OomKill")], &["oom-kill"]);
    check(
        &[("alertname", "TargetDown"), ("job", "gpuops-agent")],
        &["agent-down"],
    );
    check(&[("alertname", "TargetDown"), ("job", "node")], &[]);
    check(&[("alertname", "StorageReadOnly")], &["storage"]);
    check(&[("alertname", "StorageFull")], &["storage"]);
    check(
        &[("alertname", "StorageMountStuck")],
        &["storage-mount-stuck"],
    );
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
        "runbooks: 14 runbooks ok, 161 steps\n"
    );

    let out = Command::new(bin)
        .args(["runbook", "list", "--dir", "runbooks"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().count(), IDS.len());
    assert!(
        text.contains("gpu-xid              GPU XID error, no GPU action (application, informational; a pending row remap: GPU reset when idle)  [{alertname=~"),
        "{text}"
    );

    let set = shipped();
    for id in IDS {
        let rb = set.get(id).unwrap();
        let mut cmd = Command::new(bin);
        cmd.args(["runbook", "run", id, "--dir", "runbooks", "--dry-run"]);
        for (k, v) in [
            ("instance", "gpu-node-07:9949"),
            ("node", "gpu-node-07"),
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
            "-p",
            "node=gpu-node-07",
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
        [1/21] investigate ecc-state (node command, 30s)
            nvidia-smi -q -d ECC,PAGE_RETIREMENT,ROW_REMAPPER -i 5
        [2/21] investigate remap-counters (node command, 30s)
            nvidia-smi --query-remapped-rows=gpu_bus_id,remapped_rows.correctable,remapped_rows.uncorrectable,remapped_rows.pending,remapped_rows.failure --format=csv -i 5
        [3/21] investigate kernel-log (node command, 30s)
            journalctl -k --since -24h --no-pager --grep 'NVRM: Xid.*: (48|63|64|92|94|95|140),'
        [4/21] investigate ecc-trend (bot promql, 15s)
            promql: gpu_remapped_rows{instance="gpu-node-07.dc1:9949"} > 0 or increase(gpu_ecc_errors_total{instance="gpu-node-07.dc1:9949",type="uncorrected"}[24h]) > 0
        [5/21] investigate mig-and-persistence (node command, 30s)
            nvidia-smi --query-gpu=index,pci.bus_id,mig.mode.current,persistence_mode --format=csv -i 5
        [6/21] investigate fabric-manager (node command, 15s)
            systemctl is-active nvidia-fabricmanager
        [7/21] mitigate drain-slurm (node command, 30s, needs approval)
            sudo -n scontrol update nodename=gpu-node-07 state=drain 'reason=gpuops: manual'
        [8/21] mitigate cordon-kubernetes (bot command, 30s, needs approval)
            kubectl --kubeconfig /etc/gpuops/kubeconfig cordon gpu-node-07
        [9/21] mitigate drain-kubernetes (bot command, 11m, needs approval)
            kubectl --kubeconfig /etc/gpuops/kubeconfig drain gpu-node-07 --ignore-daemonsets --delete-emptydir-data --timeout=10m
        [10/21] investigate gpu-processes (node command, 30s)
            nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv -i 5
        [11/21] investigate holders (node command, 30s, needs approval)
            sudo -n fuser -v /dev/nvidia5 /dev/nvidiactl
        [12/21] mitigate stop-nvml-monitors (node command, 1m, needs approval)
            sudo -n systemctl stop nvidia-persistenced 'nvidia-dcgm*' 'dcgm*'
        [13/21] mitigate gpu-reset (node command, 2m, needs approval)
            sudo -n nvidia-smi -r -i 5
        [14/21] mitigate verify-gpu (node command, 1m, needs approval)
            nvidia-smi -q -d ECC,ROW_REMAPPER -i 5
        [15/21] mitigate remap-not-failed (bot promql, 15s, needs approval)
            promql: gpu_remapped_rows{instance="gpu-node-07.dc1:9949",gpu="5",state="failure"} > 0 or absent(gpu_up{instance="gpu-node-07.dc1:9949",gpu="5"})
        [16/21] mitigate start-nvml-monitors (node command, 1m, needs approval)
            sudo -n systemctl start nvidia-persistenced 'nvidia-dcgm*' 'dcgm*'
        [17/21] mitigate verify-dcgm (node command, 15m, needs approval)
            dcgmi diag -r 2
        [18/21] mitigate resume-slurm (node command, 30s, needs approval)
            sudo -n scontrol update nodename=gpu-node-07 state=resume
        [19/21] mitigate uncordon-kubernetes (bot command, 30s, needs approval)
            kubectl --kubeconfig /etc/gpuops/kubeconfig uncordon gpu-node-07
        [20/21] escalate escalate (bot command, 5s)
            echo 'If GPU 5 on gpu-node-07 shows remapped_rows.failure > 0, uncorrectable remaps that keep growing after a reset, DCGM diag failing, or XID 48/95 again within a week: keep the node drained and file an RMA with the vendor (attach nvidia-bug-report, step bug-report). Page the hardware on-call only if several GPUs or nodes are affected at once; otherwise a ticket within one business day.'
        [21/21] escalate bug-report (node command, 10m, needs approval)
            sudo -n nvidia-bug-report.sh --output-file /var/tmp/gpuops-nvidia-bug-report.log
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
                // A code the rule selects (its xid matcher, or any for `!~`).
                let code = xid_code_for(expr);
                add(&[("xid", code.as_str())]);
            }
            // The bot adds the node's real name from its agent inventory.
            add(&[("node", "gpu-node-07")]);
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

/// A catalogued XID code that `expr`'s xid matcher selects.
fn xid_code_for(expr: &str) -> String {
    let m = regex::Regex::new(r#"xid(=~|!~|=)"([^"]*)""#).unwrap();
    let c = m.captures(expr).expect("xid matcher");
    let re = regex::Regex::new(&format!("^(?:{})$", &c[2])).unwrap();
    let negated = &c[1] == "!~";
    gpuops::gpu::xid::catalogue()
        .iter()
        .map(|x| x.code.to_string())
        .find(|code| re.is_match(code) != negated)
        .expect("a catalogued code for the rule")
}

/// The node the sudoers template is rendered for in these tests.
const SUDOERS_NODE: &str = "gpu-node-07";

/// The sudoers allowlist as (program path, anchored regex over the
/// space-joined arguments), from its `Cmnd_Alias` lines.
fn sudoers_rules() -> Vec<(String, regex::Regex, String)> {
    // The shipped file is a template; rendered for the sample node as the
    // install step in its header does.
    let text = std::fs::read_to_string("packaging/privileged/sudoers")
        .unwrap()
        .replace("@NODE_NAME@", SUDOERS_NODE);
    // Join continuation lines, drop comments.
    let mut joined = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.is_empty() {
            joined.push('\n');
            continue;
        }
        match line.strip_suffix('\\') {
            Some(l) => {
                joined.push_str(l);
                joined.push(' ');
            }
            None => {
                joined.push_str(line);
                joined.push('\n');
            }
        }
    }
    let mut out = Vec::new();
    for line in joined.lines().filter(|l| l.starts_with("Cmnd_Alias ")) {
        let (_, specs) = line.split_once('=').expect("Cmnd_Alias NAME = ...");
        // Commands are separated by unescaped commas.
        let mut cmds = Vec::new();
        let mut cur = String::new();
        let mut chars = specs.chars().peekable();
        while let Some(c) = chars.next() {
            if c == '\\' {
                if let Some(n) = chars.next() {
                    cur.push('\\');
                    cur.push(n);
                }
            } else if c == ',' {
                cmds.push(std::mem::take(&mut cur));
            } else {
                cur.push(c);
            }
        }
        cmds.push(cur);
        for cmd in cmds {
            let cmd = cmd.trim();
            let (path, args) = cmd.split_once(' ').unwrap_or((cmd, ""));
            let args = args
                .trim()
                .replace("\\,", ",")
                .replace("\\=", "=")
                .replace("\\:", ":");
            assert!(
                args.starts_with('^') && args.ends_with('$'),
                "sudoers: {cmd}: arguments must be an anchored regex"
            );
            let re = regex::Regex::new(&args).unwrap_or_else(|e| panic!("{cmd}: {e}"));
            out.push((path.to_string(), re, cmd.to_string()));
        }
    }
    assert!(out.len() >= 6, "{out:?}");
    out
}

/// Sample values for the README's `<param>` placeholders: every value a
/// parameter's pattern allows where it is a closed set, else typical ones.
fn sample_values(param: &str) -> Vec<&'static str> {
    match param {
        // The one node the rendered allowlist names (SUDOERS_NODE).
        "node" => vec![SUDOERS_NODE],
        "alertname" => vec!["GPUCriticalXID", "manual"],
        "mountpoint" => vec!["/scratch", "/"],
        "gpu" => vec!["0", "3", "12"],
        "unit" => vec![
            "nvidia-fabricmanager",
            "nvidia-persistenced",
            "nvidia-dcgm",
            "dcgm",
        ],
        other => panic!("no sample values for <{other}>"),
    }
}

/// Every instance of a README shape, with its placeholders filled.
fn instances(shape: &str) -> Vec<String> {
    let ph = regex::Regex::new(r"<([a-z_]+)>").unwrap();
    let mut out = vec![shape.to_string()];
    while let Some(c) = ph.captures(&out[0].clone()) {
        let (whole, name) = (c[0].to_string(), c[1].to_string());
        out = out
            .iter()
            .flat_map(|s| {
                sample_values(&name)
                    .into_iter()
                    .map(|v| s.replacen(&whole, v, 1))
                    .collect::<Vec<_>>()
            })
            .collect();
    }
    out
}

/// The sudoers rules allowing `line` (`sudo -n PROGRAM ARGS...`).
fn allowing<'a>(
    rules: &'a [(String, regex::Regex, String)],
    line: &str,
) -> Vec<&'a (String, regex::Regex, String)> {
    let rest = line.strip_prefix("sudo -n ").expect("sudo -n");
    let (prog, args) = rest.split_once(' ').unwrap_or((rest, ""));
    rules
        .iter()
        .filter(|(path, re, _)| path.rsplit('/').next() == Some(prog) && re.is_match(args))
        .collect()
}

/// Finding 12b: the shipped rule let the agent's user drain any Slurm
/// node; the rendered template allows its own node only, and the template
/// left unrendered allows no node at all.
#[test]
fn sudoers_lets_the_agent_drain_only_its_own_node() {
    let rules = sudoers_rules();
    let reason = "reason=gpuops: GPUFellOffBus";
    let own = format!("sudo -n scontrol update nodename={SUDOERS_NODE} state=drain {reason}");
    assert!(!allowing(&rules, &own).is_empty(), "{own}");
    for other in ["gpu-node-08", "n1", "gpu-node-070", "login01"] {
        for line in [
            format!("sudo -n scontrol update nodename={other} state=drain {reason}"),
            format!("sudo -n scontrol update nodename={other} state=resume"),
        ] {
            assert!(
                allowing(&rules, &line).is_empty(),
                "sudoers allows `{line}`"
            );
        }
    }
    let template = std::fs::read_to_string("packaging/privileged/sudoers").unwrap();
    assert!(
        !template.contains("nodename\\=[") && template.contains("nodename\\=@NODE_NAME@ "),
        "the shipped rule must name the node, not a pattern"
    );
}

#[test]
fn sudoers_allows_exactly_the_privileged_argv_the_runbooks_use() {
    let rules = sudoers_rules();
    let shapes = readme_shapes();
    let mut used = std::collections::BTreeSet::new();
    for shape in &shapes {
        for line in instances(shape) {
            let ok = allowing(&rules, &line);
            assert!(
                !ok.is_empty(),
                "packaging/privileged/sudoers does not allow `{line}` (runbooks/README.md: {shape})"
            );
            used.extend(ok.iter().map(|r| r.2.clone()));
            // One more argument is never allowed.
            assert!(
                allowing(&rules, &format!("{line} --extra")).is_empty(),
                "sudoers allows `{line} --extra`"
            );
        }
    }
    for (_, _, cmd) in &rules {
        assert!(
            used.contains(cmd),
            "packaging/privileged/sudoers allows `{cmd}` but no shipped runbook runs it"
        );
    }
    // What the runbooks must never get as root.
    for line in [
        "sudo -n nvidia-smi --gpu-reset -i 3",
        "sudo -n systemctl stop gpuops-agent",
        "sudo -n systemctl restart ssh",
        "sudo -n scontrol update nodename=n1 state=down reason=x",
        "sudo -n scontrol update nodename=gpu-node-08 state=resume",
        "sudo -n scontrol update nodename=gpu-node-071 state=resume",
        "sudo -n fuser -k /dev/nvidia3",
    ] {
        assert!(allowing(&rules, line).is_empty(), "sudoers allows `{line}`");
    }
}

/// Every `gpuops runbook ...` example in README.md (its ```sh blocks) runs
/// with the real binary and succeeds; `run` examples are dry runs.
#[test]
fn readme_runbook_examples_run() {
    let readme = std::fs::read_to_string("README.md").unwrap();
    let mut examples = Vec::new();
    let mut in_block = false;
    for line in readme.lines() {
        if line.starts_with("```") {
            in_block = !in_block;
            continue;
        }
        let line = line.split(" #").next().unwrap_or("").trim();
        // The command synopsis (`check DIR | list [--dir DIR] | ...`) is not an example.
        if in_block && line.starts_with("gpuops runbook ") && !line.contains(" | ") {
            examples.push(line.to_string());
        }
    }
    assert!(examples.len() >= 3, "{examples:?}");
    assert!(examples
        .iter()
        .any(|e| e.starts_with("gpuops runbook run ")));
    for example in &examples {
        let args: Vec<&str> = example.split_whitespace().skip(1).collect();
        if args[1] == "run" {
            assert!(
                args.contains(&"--dry-run"),
                "README example `{example}` runs steps for real; make it a dry run"
            );
        }
        let out = Command::new(env!("CARGO_BIN_EXE_gpuops"))
            .args(&args)
            .env_remove("GPUOPS_PROMETHEUS_URL")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "README example `{example}` failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// On a node, `runbook run` without `-p node=` acts on this host.
#[test]
fn run_on_a_node_takes_node_from_the_host_name() {
    let out = Command::new(env!("CARGO_BIN_EXE_gpuops"))
        .args([
            "runbook",
            "run",
            "gpu-reset",
            "--dir",
            "runbooks",
            "--dry-run",
            "-p",
            "gpu=1",
            "-p",
            "instance=localhost:9949",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let host = gpuops::runbook::cli::local_node_name().expect("this host has a name");
    assert!(
        stdout.contains(&format!("  node={host} (this host)\n")),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("scontrol update nodename={host} state=drain")),
        "{stdout}"
    );
    assert!(!stdout.contains("nodename=10"), "{stdout}");
}

/// `nvidia-smi -q -d TYPES` names only display types nvidia-smi knows
/// (`nvidia-smi -h`, R470 and later): `-d FABRIC`, say, is an error there.
#[test]
fn nvidia_smi_display_types_exist() {
    const TYPES: &[&str] = &[
        "MEMORY",
        "UTILIZATION",
        "ECC",
        "TEMPERATURE",
        "POWER",
        "CLOCK",
        "COMPUTE",
        "PIDS",
        "PERFORMANCE",
        "SUPPORTED_CLOCKS",
        "PAGE_RETIREMENT",
        "ACCOUNTING",
        "ENCODER_STATS",
        "SUPPORTED_GPU_TARGET_TEMP",
        "VOLTAGE",
        "FBC_STATS",
        "ROW_REMAPPER",
        "RESET_STATUS",
        "GSP_FIRMWARE_VERSION",
    ];
    let mut checked = 0;
    for rb in &shipped().runbooks {
        for s in &rb.steps {
            let Action::Command { argv } = &s.action else {
                continue;
            };
            let words: Vec<String> = argv.iter().map(|t| t.source()).collect();
            if !words.iter().any(|w| w == "nvidia-smi") {
                continue;
            }
            for (i, w) in words.iter().enumerate() {
                if w == "-d" || w == "--display" {
                    let list = words.get(i + 1).expect("-d needs a value");
                    for t in list.split(',') {
                        assert!(
                            TYPES.contains(&t),
                            "{}/{}: nvidia-smi has no display type {t}",
                            rb.id,
                            s.name
                        );
                        checked += 1;
                    }
                }
            }
        }
    }
    assert!(checked >= 5, "only {checked} display types");
}

/// Issue 22, observation 3: `lsof -n -P +L1 /scratch` ORs its conditions and
/// lists deleted files on every filesystem; with `-a` it lists only those on
/// the mount point. The step's rendered argv, run for real against an empty
/// directory while this process holds a deleted file elsewhere, must not
/// name that file.
#[test]
#[ignore = "needs lsof: run by .ci/run"]
fn storage_lsof_ands_its_conditions() {
    let rb = shipped().get("storage").unwrap().clone();
    let elsewhere = tempfile::tempdir().unwrap();
    let held = elsewhere.path().join("gpuops-held-deleted-file");
    let _open = std::fs::File::create(&held).unwrap();
    std::fs::remove_file(&held).unwrap();
    let mount = tempfile::tempdir().unwrap();
    let mut labels = sample_labels();
    labels.insert("mountpoint".into(), mount.path().display().to_string());
    let plan = engine::plan(&rb, &BTreeMap::new(), &labels).unwrap();
    let step = plan
        .steps
        .iter()
        .find(|s| matches!(&s.rendered, engine::Rendered::Command { argv } if argv.first().map(String::as_str) == Some("lsof")))
        .expect("the storage runbook has an lsof step");
    let engine::Rendered::Command { argv } = &step.rendered else {
        unreachable!()
    };
    let out = std::process::Command::new(&argv[0])
        .args(&argv[1..])
        .output()
        .expect("lsof runs (install lsof)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !stdout.contains("gpuops-held-deleted-file"),
        "{argv:?} listed a deleted file outside {}:\n{stdout}",
        mount.path().display()
    );
}

/// Issue 22, observation 4: `only_if_exists: /usr/bin/scontrol` said "no
/// Slurm" on a node whose scontrol is `/opt/slurm/bin/scontrol`. Runbooks
/// name binaries by name (the plan resolves them on the node's PATH); no
/// shipped runbook names one by absolute path in `run:` (its program, or
/// the command after sudo) or in `only_if_exists`.
#[test]
fn no_shipped_runbook_names_a_binary_by_absolute_path() {
    use gpuops::runbook::exec::resolve::{is_sudo, sudo_command_index};
    use gpuops::runbook::Action;
    let set = shipped();
    let mut bad = Vec::new();
    for rb in &set.runbooks {
        for s in &rb.steps {
            if let Action::Command { argv } = &s.action {
                let argv: Vec<String> = argv.iter().map(|t| t.source()).collect();
                let mut programs = vec![argv[0].clone()];
                if is_sudo(&argv[0]) {
                    if let Some(i) = sudo_command_index(&argv) {
                        programs.push(argv[i].clone());
                    }
                }
                for p in programs.iter().filter(|p| p.contains('/')) {
                    bad.push(format!("{} {}: run: {p}", rb.id, s.name));
                }
            }
            if let Some(p) = &s.flow.only_if_exists {
                let dirs = gpuops::runbook::exec::resolve::DEFAULT_SEARCH_PATH;
                if dirs.split(':').any(|d| p.starts_with(&format!("{d}/"))) {
                    bad.push(format!("{} {}: only_if_exists: {p}", rb.id, s.name));
                }
            }
        }
    }
    assert!(
        bad.is_empty(),
        "binaries named by path:\n{}",
        bad.join("\n")
    );
}

/// A failed DCGM diagnostic let the node go back into service while its
/// failure line said it stays drained: every step that returns a node to
/// service in a runbook with a DCGM diagnostic requires it (`verify-dcgm?`:
/// passed, or dcgmi is not installed on the node).
#[test]
fn dcgm_diagnostic_failure_keeps_the_node_out_of_service() {
    let set = shipped();
    let mut checked = 0;
    for rb in &set.runbooks {
        if rb.step("verify-dcgm").is_none() {
            continue;
        }
        for s in rb
            .steps
            .iter()
            .filter(|s| s.name.starts_with("resume") || s.name.starts_with("uncordon"))
        {
            assert!(
                s.flow.requires.iter().any(|r| r == "verify-dcgm")
                    || s.flow
                        .requires_if_available
                        .iter()
                        .any(|r| r == "verify-dcgm"),
                "{}: {} returns the node to service without the DCGM diagnostic",
                rb.id,
                s.name
            );
            checked += 1;
        }
    }
    assert!(checked >= 8, "only {checked} return-to-service steps found");
}
