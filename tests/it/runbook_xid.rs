//! XIDs get the runbook of their resolution class: the XID catalogue
//! (src/gpu/xid.rs, after NVIDIA's Xid Catalog), the shipped alert rules
//! (config/prometheus/rules/gpuops-alerts.yml) and the runbooks' triggers
//! (runbooks/*.yaml) agree code by code, and the steps a suggested runbook
//! offers fit the class: 79 is never a GPU reset, no-action and application
//! XIDs offer no mitigation, a reset is drained before and verified after.

use std::collections::BTreeMap;
use std::path::Path;

use gpuops::gpu::xid::{self, XidInfo, XidResolution, XidSeverity};
use gpuops::runbook::engine::{self, Rendered, RunPlan};
use gpuops::runbook::{Phase, RunbookSet};

fn shipped() -> RunbookSet {
    let (set, errors) = RunbookSet::load_dir(Path::new("runbooks"));
    assert!(errors.0.is_empty(), "shipped runbooks invalid:\n{errors}");
    set
}

/// An XID alert rule: name, how it selects codes, severity, runbook.
#[derive(Debug)]
struct XidRule {
    alert: String,
    /// `=~` (or `=`) regex, or `!~` regex.
    negated: bool,
    regex: regex::Regex,
    severity: String,
    runbook: String,
}

impl XidRule {
    fn fires_for(&self, code: u32) -> bool {
        self.regex.is_match(&code.to_string()) != self.negated
    }
}

/// The shipped alert rules on `gpu_xid_errors_total`, with their xid matcher.
fn xid_rules() -> Vec<XidRule> {
    let text = std::fs::read_to_string("config/prometheus/rules/gpuops-alerts.yml").unwrap();
    let doc: serde_norway::Value = serde_norway::from_str(&text).unwrap();
    let matcher = regex::Regex::new(r#"xid(=~|!~|=)"([^"]*)""#).unwrap();
    let mut out = Vec::new();
    for group in doc["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            let (Some(alert), Some(expr)) = (rule["alert"].as_str(), rule["expr"].as_str()) else {
                continue;
            };
            if !expr.contains("gpu_xid_errors_total") {
                continue;
            }
            let sels: Vec<(String, String)> = matcher
                .captures_iter(expr)
                .map(|c| (c[1].to_string(), c[2].to_string()))
                .collect();
            assert!(!sels.is_empty(), "{alert}: no xid matcher in {expr}");
            assert!(
                sels.iter().all(|s| s == &sels[0]),
                "{alert}: every arm selects the same codes: {sels:?}"
            );
            let (op, re) = &sels[0];
            out.push(XidRule {
                alert: alert.to_string(),
                negated: op == "!~",
                regex: regex::Regex::new(&format!("^(?:{re})$")).unwrap(),
                severity: rule["labels"]["severity"].as_str().unwrap().to_string(),
                runbook: rule["annotations"]["runbook"].as_str().unwrap().to_string(),
            });
        }
    }
    assert!(out.len() >= 5, "{out:?}");
    out
}

/// The one shipped XID alert that fires for `code`.
fn rule_for(rules: &[XidRule], code: u32) -> &XidRule {
    let firing: Vec<&XidRule> = rules.iter().filter(|r| r.fires_for(code)).collect();
    assert_eq!(
        firing.len(),
        1,
        "xid {code} must fire exactly one XID alert, fires {:?}",
        firing.iter().map(|r| &r.alert).collect::<Vec<_>>()
    );
    firing[0]
}

/// The labels such an alert carries once the bot has added the node's name.
fn labels(alert: &str, code: u32) -> BTreeMap<String, String> {
    [
        ("alertname", alert.to_string()),
        ("xid", code.to_string()),
        ("gpu", "3".into()),
        ("pci_bus_id", "00000000:3B:00.0".into()),
        ("instance", "10.0.0.7:9949".into()),
        ("node", "gpu-node-07".into()),
        ("job", "gpuops-agent".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// The runbook suggested for `code`'s alert (exactly one) and its plan.
fn suggested_plan(set: &RunbookSet, code: u32) -> RunPlan {
    let rules = xid_rules();
    let rule = rule_for(&rules, code);
    let labels = labels(&rule.alert, code);
    let suggested: Vec<&str> = set.suggest(&labels).iter().map(|r| r.id.as_str()).collect();
    assert_eq!(suggested.len(), 1, "xid {code}: suggested {suggested:?}");
    let rb = set.get(suggested[0]).unwrap();
    engine::plan(rb, &BTreeMap::new(), &labels).unwrap_or_else(|e| panic!("xid {code}: {e}"))
}

fn argvs(plan: &RunPlan) -> Vec<(&str, Phase, &Vec<String>)> {
    plan.steps
        .iter()
        .filter_map(|s| match &s.rendered {
            Rendered::Command { argv } => Some((s.step.name.as_str(), s.step.phase, argv)),
            _ => None,
        })
        .collect()
}

fn is_gpu_reset(argv: &[String]) -> bool {
    argv.iter().any(|a| a == "nvidia-smi") && argv.iter().any(|a| a == "-r" || a == "--gpu-reset")
}

/// The steps `name` requires, directly or through the steps it requires.
fn required_closure(plan: &RunPlan, name: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut todo = vec![name.to_string()];
    while let Some(n) = todo.pop() {
        let Some(s) = plan.step(&n) else { continue };
        for r in &s.step.flow.requires {
            if !out.contains(r) {
                out.push(r.clone());
                todo.push(r.clone());
            }
        }
    }
    out
}

/// The application and no-action XIDs' runbook (gpu-xid): no drain at all,
/// and its only change is the approval-gated GPU reset that applies a
/// pending row remap: every mitigation that acts on the node needs the
/// `remap-pending` check (a query that succeeds only when it finds the
/// pending remap), the reset also `gpu-idle` and `remap-failed`; the only
/// mitigation outside that path is the read-only `remap-failed` query.
fn assert_no_drain_and_a_reset_only_for_a_pending_remap(plan: &RunPlan) {
    let id = &plan.runbook.id;
    for (name, _, argv) in argvs(plan) {
        if argv[0] == "echo" {
            continue; // text, checked against the catalogue elsewhere
        }
        for word in ["scontrol", "kubectl", "drain", "cordon"] {
            assert!(
                !argv.iter().any(|a| a.contains(word)),
                "{id}: step {name} drains: {argv:?}"
            );
        }
    }
    for s in plan
        .steps
        .iter()
        .filter(|s| s.step.phase == Phase::Mitigate)
    {
        if let Rendered::Promql { .. } = s.rendered {
            if s.step.name == "remap-failed" {
                continue;
            }
        }
        let needs = required_closure(plan, &s.step.name);
        assert!(
            needs.iter().any(|n| n == "remap-pending"),
            "{id}: mitigation {} does not depend on remap-pending: {needs:?}",
            s.step.name
        );
        assert!(s.step.needs_approval, "{id}: {}", s.step.name);
    }
    let reset = &plan.steps[pos(plan, "gpu-reset")];
    let Rendered::Command { argv } = &reset.rendered else {
        panic!("{id}: gpu-reset is not a command");
    };
    assert!(is_gpu_reset(argv), "{argv:?}");
    assert!(reset.step.releases_gpu && reset.step.needs_approval);
    let needs = required_closure(plan, "gpu-reset");
    for gate in [
        "remap-pending",
        "remap-failed",
        "gpu-idle",
        "stop-nvml-monitors",
    ] {
        assert!(
            needs.iter().any(|n| n == gate),
            "{id}: gpu-reset: {needs:?}"
        );
    }
    let pending = plan.step("remap-pending").expect("remap-pending");
    assert_eq!(pending.step.phase, Phase::Investigate);
    assert!(matches!(
        pending.step.action,
        gpuops::runbook::Action::Promql {
            fail_if_none: true,
            fail_if_any: false,
            ..
        }
    ));
}

fn entry(code: u32) -> &'static XidInfo {
    xid::lookup(code).unwrap_or_else(|| panic!("xid {code} not in the catalogue"))
}

/// The position of the first step named `name` (panics if absent).
fn pos(plan: &RunPlan, name: &str) -> usize {
    plan.steps
        .iter()
        .position(|s| s.step.name == name)
        .unwrap_or_else(|| panic!("{}: no step {name}", plan.runbook.id))
}

/// Drain first, then stop what holds the GPU, reset, verify, and only then
/// return the node to service.
fn assert_closed_reset_loop(plan: &RunPlan) {
    let id = &plan.runbook.id;
    let reset = pos(plan, "gpu-reset");
    assert!(is_gpu_reset(match &plan.steps[reset].rendered {
        Rendered::Command { argv } => argv,
        other => panic!("{id}: gpu-reset is {other:?}"),
    }));
    for before in [
        "drain-slurm",
        "cordon-kubernetes",
        "drain-kubernetes",
        "holders",
        "stop-nvml-monitors",
    ] {
        assert!(pos(plan, before) < reset, "{id}: {before} after the reset");
    }
    for after in [
        "verify-gpu",
        "verify-dcgm",
        "resume-slurm",
        "uncordon-kubernetes",
    ] {
        assert!(pos(plan, after) > reset, "{id}: {after} before the reset");
    }
    for verify in ["verify-gpu", "verify-dcgm"] {
        assert!(pos(plan, verify) < pos(plan, "resume-slurm"), "{id}");
        assert!(pos(plan, verify) < pos(plan, "uncordon-kubernetes"), "{id}");
        // A verification gates the return to service: mitigate phase (a
        // failed mitigation stops the later ones), read-only.
        let s = &plan.steps[pos(plan, verify)];
        assert_eq!(s.step.phase, Phase::Mitigate, "{id}: {verify}");
    }
    let drain_k8s = &plan.steps[pos(plan, "drain-kubernetes")];
    let Rendered::Command { argv } = &drain_k8s.rendered else {
        panic!("{id}: drain-kubernetes is not a command");
    };
    for flag in ["drain", "--ignore-daemonsets", "--delete-emptydir-data"] {
        assert!(argv.iter().any(|a| a == flag), "{id}: {argv:?}");
    }
    for name in ["resume-slurm", "uncordon-kubernetes", "gpu-reset"] {
        assert!(
            plan.steps[pos(plan, name)].step.needs_approval,
            "{id}: {name}"
        );
    }
}

#[test]
fn every_catalogued_xid_fires_one_alert_of_its_class() {
    let rules = xid_rules();
    for x in xid::catalogue() {
        let rule = rule_for(&rules, x.code);
        assert_eq!(
            rule.runbook, x.runbook,
            "xid {}: alert {} names runbook {}, the catalogue {}",
            x.code, rule.alert, rule.runbook, x.runbook
        );
        assert_eq!(
            rule.severity == "critical",
            x.severity == XidSeverity::Critical,
            "xid {}: alert {} is {}, the catalogue says {:?}",
            x.code,
            rule.alert,
            rule.severity,
            x.severity
        );
    }
    // A code the catalogue does not know is a plain, non-critical notice.
    let unknown = rule_for(&rules, 999);
    assert_eq!(
        (unknown.alert.as_str(), unknown.runbook.as_str()),
        ("GPUXIDError", "gpu-xid")
    );
}

#[test]
fn every_catalogued_xid_suggests_its_runbook_with_steps_that_fit_its_class() {
    let set = shipped();
    for x in xid::catalogue() {
        let plan = suggested_plan(&set, x.code);
        assert_eq!(plan.runbook.id, x.runbook, "xid {}", x.code);
        assert_eq!(x.severity, x.resolution.severity(), "xid {}", x.code);
        match x.resolution {
            XidResolution::Ignore | XidResolution::RestartApp | XidResolution::ContactSupport => {
                assert_eq!(plan.runbook.id, "gpu-xid", "xid {}", x.code);
                assert_no_drain_and_a_reset_only_for_a_pending_remap(&plan);
            }
            XidResolution::ResetGpu | XidResolution::CheckNvlink => {
                assert_closed_reset_loop(&plan);
            }
            XidResolution::RestartBm => {
                for (name, _, argv) in argvs(&plan) {
                    assert!(!is_gpu_reset(argv), "xid {}: step {name} {argv:?}", x.code);
                }
                assert!(plan.step("reboot").is_some(), "xid {}", x.code);
            }
        }
    }
}

#[test]
fn xid_79_never_offers_a_gpu_reset_but_a_reboot() {
    let plan = suggested_plan(&shipped(), 79);
    assert_eq!(plan.runbook.id, "gpu-fell-off-bus");
    assert_eq!(entry(79).resolution, XidResolution::RestartBm);
    for (name, _, argv) in argvs(&plan) {
        assert!(!is_gpu_reset(argv), "step {name}: {argv:?}");
    }
    let reboot = pos(&plan, "reboot");
    assert!(pos(&plan, "drain-slurm") < reboot);
    assert!(pos(&plan, "verify-gpus") > reboot);
    assert!(pos(&plan, "resume-slurm") > pos(&plan, "verify-gpus"));
    // The GPU-lost alerts from NVML get the same runbook.
    let set = shipped();
    for alert in ["GPUFellOffBus", "GPUDown", "GPUMissing"] {
        let ids: Vec<&str> = set
            .suggest(&labels(alert, 79))
            .iter()
            .map(|r| r.id.as_str())
            .collect();
        assert_eq!(ids, ["gpu-fell-off-bus"], "{alert}");
    }
}

#[test]
fn xid_63_and_92_offer_no_mitigation_but_the_pending_remap_reset() {
    let set = shipped();
    for code in [63, 92] {
        assert_eq!(entry(code).resolution, XidResolution::Ignore, "xid {code}");
        let plan = suggested_plan(&set, code);
        assert_no_drain_and_a_reset_only_for_a_pending_remap(&plan);
    }
}

#[test]
fn xid_48_takes_the_ecc_path() {
    let plan = suggested_plan(&shipped(), 48);
    assert_eq!(plan.runbook.id, "gpu-ecc-remap");
    assert_eq!(entry(48).nvidia_bucket, "WORKFLOW_XID_48");
    assert_closed_reset_loop(&plan);
    assert!(plan.step("remap-counters").is_some());
}

#[test]
fn xid_94_restarts_the_application_without_a_drain() {
    let plan = suggested_plan(&shipped(), 94);
    assert_eq!(entry(94).resolution, XidResolution::RestartApp);
    assert_eq!(plan.runbook.id, "gpu-xid");
    assert_no_drain_and_a_reset_only_for_a_pending_remap(&plan);
    // The reset path is gpu-reset's, in its order, one approval for it all.
    let order = [
        "remap-pending",
        "remap-failed",
        "gpu-idle",
        "stop-nvml-monitors",
        "gpu-reset",
        "verify-gpu",
        "remap-applied",
        "start-nvml-monitors",
    ];
    for w in order.windows(2) {
        assert!(pos(&plan, w[0]) < pos(&plan, w[1]), "{w:?}");
    }
    for name in &order[3..] {
        let s = &plan.steps[pos(&plan, name)];
        assert_eq!(
            s.step.approval_group.as_deref(),
            Some("reset-path"),
            "{name}"
        );
    }
    for name in ["stop-nvml-monitors", "gpu-reset"] {
        let s = &plan.steps[pos(&plan, name)];
        assert_eq!(s.step.roles, [gpuops::runbook::Role::Admin], "{name}");
    }
    assert_eq!(
        plan.step("start-nvml-monitors").unwrap().step.flow.requires,
        ["stop-nvml-monitors"]
    );
}

#[test]
fn xid_13_takes_the_application_path() {
    let set = shipped();
    for code in [13, 31, 43, 45] {
        let plan = suggested_plan(&set, code);
        assert_eq!(plan.runbook.id, "gpu-xid", "xid {code}");
        assert_no_drain_and_a_reset_only_for_a_pending_remap(&plan);
        assert!(
            plan.steps.iter().any(|s| s.step.name == "gpu-processes"),
            "xid {code}: shows whose job it was"
        );
    }
}

#[test]
fn xid_74_and_144_take_the_nvlink_path() {
    let set = shipped();
    for code in [74, 144, 149, 150] {
        let plan = suggested_plan(&set, code);
        assert_eq!(plan.runbook.id, "gpu-nvlink", "xid {code}");
        assert_eq!(entry(code).resolution, XidResolution::CheckNvlink);
        assert_closed_reset_loop(&plan);
    }
}

#[test]
fn reset_class_xids_take_the_gpu_reset_loop() {
    let set = shipped();
    for code in [62, 119, 120] {
        let plan = suggested_plan(&set, code);
        assert_eq!(plan.runbook.id, "gpu-reset", "xid {code}");
        assert_closed_reset_loop(&plan);
        for name in ["mig-and-persistence", "fabric-manager", "holders"] {
            assert!(plan.step(name).is_some(), "xid {code}: {name}");
        }
    }
}

#[test]
fn node_comes_from_the_node_label_never_from_instance() {
    let set = shipped();
    let mut labels = labels("GPUCriticalXID", 62);
    let rb = set.get("gpu-reset").unwrap();
    let plan = engine::plan(rb, &BTreeMap::new(), &labels).unwrap();
    assert_eq!(plan.params.get("node"), Some("gpu-node-07"));
    labels.remove("node");
    let e = engine::plan(rb, &BTreeMap::new(), &labels).unwrap_err();
    assert!(e.to_string().contains("parameter node:"), "{e}");
    for rb in &set.runbooks {
        if let Some(p) = rb.param("node") {
            assert_eq!(p.from_label.as_deref(), Some("node"), "{}", rb.id);
            assert!(
                p.validate("10.0.0.7:9949").is_err() && p.validate("gpu-node-07").is_ok(),
                "{}: node must be a plain host name",
                rb.id
            );
        }
    }
}

/// Issue 22, observations 1 and 2: XID 79 got three different instructions
/// (the alert "needs a reset or the node a reboot", the report "reset or
/// reseat the GPU") and XID 94's runbook said "not a GPU fault … (no page)"
/// without the row remap. For every catalogued code, the catalogue's action
/// (which the chat note and the report's XID lines print), every alert rule
/// that fires for it (summary and description) and every runbook its alert
/// suggests (title, description, step descriptions, the echo texts it
/// prints, rendered for that code) agree with the catalogue
/// ([`xid::disagreement`]): 79 drains, reboots and power-cycles through the
/// BMC and never instructs a reset; 94 restarts the application, never
/// drains and names the row remap.
#[test]
fn xid_texts_agree_with_the_catalogue_everywhere() {
    let set = shipped();
    let text = std::fs::read_to_string("config/prometheus/rules/gpuops-alerts.yml").unwrap();
    let doc: serde_norway::Value = serde_norway::from_str(&text).unwrap();
    let xid_rules = xid_rules();
    let mut bad = Vec::new();
    let mut checked = 0;
    for info in xid::catalogue() {
        let code = info.code;
        if let Some(why) = xid::disagreement(code, info.action) {
            bad.push(format!("catalogue: {why}"));
        }
        for group in doc["groups"].as_sequence().unwrap() {
            for rule in group["rules"].as_sequence().unwrap() {
                let (Some(alert), Some(expr)) = (rule["alert"].as_str(), rule["expr"].as_str())
                else {
                    continue;
                };
                let fires = if expr.contains("gpu_xid_errors_total") {
                    xid_rules
                        .iter()
                        .any(|r| r.alert == alert && r.fires_for(code))
                } else {
                    expr.contains("type=\"fell_off_bus\"") && code == 79
                };
                if !fires {
                    continue;
                }
                let words = format!(
                    "{}\n{}",
                    rule["annotations"]["summary"].as_str().unwrap_or(""),
                    rule["annotations"]["description"].as_str().unwrap_or("")
                );
                if let Some(why) = xid::disagreement(code, &words) {
                    bad.push(format!("alert {alert}: {why}"));
                }
                checked += 1;
            }
        }
        let rule = rule_for(&xid_rules, code);
        let labels = labels(&rule.alert, code);
        for rb in set.suggest(&labels) {
            let plan = engine::plan(rb, &BTreeMap::new(), &labels)
                .unwrap_or_else(|e| panic!("xid {code}: {e}"));
            let mut words = vec![rb.title.clone(), rb.description.clone()];
            for s in &plan.steps {
                words.push(s.step.description.clone());
                if let Rendered::Command { argv } = &s.rendered {
                    if argv.first().map(String::as_str) == Some("echo") {
                        words.push(argv[1..].join(" "));
                    }
                }
            }
            if let Some(why) = xid::disagreement(code, &words.join("\n")) {
                bad.push(format!("runbook {}: {why}", rb.id));
            }
            checked += 1;
        }
    }
    assert!(checked > 2 * xid::catalogue().len(), "only {checked} texts");
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// The check itself: it catches the texts issue 22 found.
#[test]
fn xid_disagreement_catches_the_old_texts() {
    for (code, old) in [
        (
            79,
            "Jobs on it have failed; the GPU needs a reset or the node a reboot.",
        ),
        (
            79,
            "drain the node, reset or reseat the GPU (runbook `gpu-fell-off-bus`)",
        ),
        (
            94,
            "XID 94 is not a GPU fault by itself: tell the job owner (no page).",
        ),
        (
            94,
            "Restart the application, drain the node and remap the row.",
        ),
    ] {
        assert!(xid::disagreement(code, old).is_some(), "{code}: {old}");
    }
    assert_eq!(
        xid::disagreement(
            79,
            "Drain the node and reboot it; power-cycle it through the BMC if the GPU is still missing; never a GPU reset (it cannot reach the GPU)."
        ),
        None
    );
}

/// Row remaps done right (issue 22): a remap failure (`state="failure"`)
/// keeps the GPU drained for hardware replacement. After the reset the
/// gpu-ecc-remap loop checks the failure flag (`remap-not-failed`, a query
/// that fails when it finds the flag set); when that check fails nothing
/// returns the node to service, and the node's state says why.
#[test]
fn remap_failure_keeps_the_gpu_drained() {
    use engine::{next_action, node_state, NextAction, StepStatus::*};
    let set = shipped();
    let plan = suggested_plan(&set, 64);
    assert_eq!(plan.runbook.id, "gpu-ecc-remap");
    let check = plan
        .step("remap-not-failed")
        .expect("a remap-not-failed step");
    match (&check.step.action, &check.rendered) {
        (gpuops::runbook::Action::Promql { fail_if_any, .. }, Rendered::Promql { query }) => {
            assert!(*fail_if_any);
            assert!(
                query.contains("gpu_remapped_rows{")
                    && query.contains("state=\"failure\"")
                    && query.contains("gpu=\"3\""),
                "{query}"
            );
        }
        other => panic!("{other:?}"),
    }
    let done: Vec<(String, engine::StepStatus)> = [
        ("drain-slurm", Succeeded),
        ("stop-nvml-monitors", Succeeded),
        ("gpu-reset", Succeeded),
        ("verify-gpu", Succeeded),
        ("remap-not-failed", Failed),
    ]
    .into_iter()
    .map(|(n, s)| (n.to_string(), s))
    .collect();
    for back in ["resume-slurm", "uncordon-kubernetes"] {
        let s = plan.step(back).unwrap();
        assert!(
            matches!(next_action(&plan, s.index, &done), NextAction::Skip(_)),
            "{back} must not run after a remap failure"
        );
        // Nor when the check could not tell (no Prometheus, no answer).
        for unknown in [Skipped, Error, TimedOut] {
            let mut d = done.clone();
            d[4].1 = unknown;
            assert!(
                matches!(next_action(&plan, s.index, &d), NextAction::Skip(_)),
                "{back} must not run after remap-not-failed {unknown:?}"
            );
        }
    }
    let state = node_state(&plan, &done).join("; ");
    assert!(
        state.contains("row remap failure")
            && state.contains("stays drained for hardware replacement"),
        "{state}"
    );
    // Without the failure the node goes back.
    let mut ok = done.clone();
    ok[4].1 = Succeeded;
    // (and the DCGM diagnostic passed, or dcgmi is not installed there)
    ok.push(("verify-dcgm".to_string(), engine::StepStatus::Unavailable));
    let s = plan.step("resume-slurm").unwrap();
    assert_eq!(next_action(&plan, s.index, &ok), NextAction::Run);
}

/// `fail_if_any`: the remap check fails when Prometheus finds the failure
/// flag, and succeeds when it finds nothing (a local fake Prometheus).
#[tokio::test]
async fn remap_check_fails_when_prometheus_finds_the_failure_flag() {
    use engine::{Executor, NodeSteps, StepExecutor as _, StepStatus};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let set = shipped();
    let plan = suggested_plan(&set, 64);
    let check = plan.step("remap-not-failed").unwrap();
    for (result, want) in [
        (
            r#"[{"metric":{"gpu":"3","state":"failure"},"value":[1,"1"]}]"#,
            StepStatus::Failed,
        ),
        ("[]", StepStatus::Succeeded),
    ] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let body =
            format!(r#"{{"status":"success","data":{{"resultType":"vector","result":{result}}}}}"#);
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
        });
        let exec = Executor::new(
            std::sync::Arc::new(gpuops::runbook::exec::ProcessRunner),
            NodeSteps::Local,
            Some(format!("http://{addr}")),
        )
        .with_search_path(
            gpuops::runbook::exec::resolve::SearchPath::first_then_default(&[
                crate::support::fake_node_bins().to_path_buf(),
            ]),
        );
        let out = exec.execute(&plan, check).await;
        assert_eq!(out.status, want, "{}", out.output);
    }
}

/// What a walk through a plan came to ([`walk_with_prometheus`]).
struct RemapWalk {
    /// One line a step: its name and outcome (or why it was skipped), and
    /// `asks approval` where a run stops for an approval (which the walk
    /// then gives, as an admin would).
    trace: Vec<String>,
    /// The argv of every command run, joined by spaces.
    commands: Vec<String>,
    /// `engine::node_state`, the closing summary's node state.
    state: Vec<String>,
}

/// The rendered query of the PromQL step `name`.
fn query_of(plan: &RunPlan, name: &str) -> String {
    match &plan
        .step(name)
        .unwrap_or_else(|| panic!("no step {name}"))
        .rendered
    {
        Rendered::Promql { query } => query.clone(),
        other => panic!("{name} is {other:?}"),
    }
}

/// Walks the XID 94 plan (GPU 3) as a chat run does: in file order,
/// [`engine::next_action`] decides each step; a `needs_approval` step not
/// covered by an earlier approval of its `approval_group` stops for one
/// (recorded, then given); commands go to a recording runner, PromQL steps
/// to a fake Prometheus answering the named steps' queries with `answers`
/// (every other query: no series). Escalations are left out (they always
/// run and change nothing).
async fn walk_with_prometheus(answers: &[(&str, Vec<crate::report_support::Series>)]) -> RemapWalk {
    use engine::{next_action, node_state, Executor, NextAction, NodeSteps, StepExecutor as _};
    let plan = suggested_plan(&shipped(), 94);
    assert_eq!(plan.runbook.id, "gpu-xid");
    let url = crate::report_support::fake_prometheus(
        answers
            .iter()
            .map(|(step, series)| (query_of(&plan, step), series.clone()))
            .collect(),
    )
    .await;
    let runner = std::sync::Arc::new(gpuops::runbook::exec::RecordingRunner::new());
    let exec = Executor::new(runner.clone(), NodeSteps::Local, Some(url)).with_search_path(
        gpuops::runbook::exec::resolve::SearchPath::first_then_default(&[
            crate::support::fake_node_bins().to_path_buf(),
        ]),
    );
    let mut done: Vec<(String, engine::StepStatus)> = Vec::new();
    let mut approved: Vec<String> = Vec::new();
    let mut trace = Vec::new();
    for s in plan
        .steps
        .iter()
        .filter(|s| s.step.phase != Phase::Escalate)
    {
        let name = &s.step.name;
        if let NextAction::Skip(why) = next_action(&plan, s.index, &done) {
            trace.push(format!("{name}: {why}"));
            done.push((name.clone(), engine::StepStatus::Skipped));
            continue;
        }
        if s.step.needs_approval {
            let group = s
                .step
                .approval_group
                .clone()
                .unwrap_or_else(|| name.clone());
            if !approved.contains(&group) {
                trace.push(format!("{name}: asks approval ({group})"));
                approved.push(group);
            }
        }
        let out = exec.execute(&plan, s).await;
        trace.push(format!("{name}: {}", out.status.as_str()));
        done.push((name.clone(), out.status));
    }
    RemapWalk {
        trace,
        commands: runner
            .calls()
            .iter()
            .map(|c| {
                // Programs by name, as the runbook writes them (they were
                // resolved on the search path).
                let bins = crate::support::fake_node_bins();
                c.argv
                    .iter()
                    .map(|a| {
                        let p = std::path::Path::new(a);
                        let in_bin_dir = p.parent().is_some_and(|d| {
                            d == bins
                                || ["/usr/bin", "/bin", "/usr/sbin", "/sbin"]
                                    .iter()
                                    .any(|b| d == std::path::Path::new(b))
                        });
                        match p.file_name() {
                            Some(n) if in_bin_dir => n.to_string_lossy().into_owned(),
                            _ => a.clone(),
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect(),
        state: node_state(&plan, &done),
    }
}

/// A pending row remap on GPU 3 (the `gpu_remapped_rows{state="pending"}`
/// series at 1).
fn pending() -> (&'static str, Vec<crate::report_support::Series>) {
    (
        "remap-pending",
        vec![(vec![("gpu", "3"), ("state", "pending")], 1.0)],
    )
}

/// Row remaps done right (issue 22, observation 2): XID 94 with a pending
/// row remap on an idle GPU reaches the gpu-reset path, and the first step
/// of it asks for one approval covering the reset (admin only, releasing
/// NVML); after the reset the remap shows applied and the node's state says
/// so. Nothing is drained.
#[tokio::test]
async fn pending_row_remap_offers_an_approval_gated_reset_for_an_idle_gpu() {
    let w = walk_with_prometheus(&[
        pending(),
        (
            "remap-applied",
            vec![(vec![("gpu", "3"), ("state", "pending")], 0.0)],
        ),
    ])
    .await;
    expect_test::expect![[r#"
        xid-meaning: succeeded
        kernel-log: succeeded
        gpu-errors: succeeded
        gpu-processes: succeeded
        xid-rate: succeeded
        remap-state: succeeded
        remap-pending: succeeded
        remap-failed: succeeded
        gpu-idle: succeeded
        stop-nvml-monitors: asks approval (reset-path)
        stop-nvml-monitors: succeeded
        gpu-reset: succeeded
        verify-gpu: succeeded
        remap-applied: succeeded
        start-nvml-monitors: succeeded"#]]
    .assert_eq(&w.trace.join("\n"));
    // The one approval covers the reset itself: admin only, NVML released.
    let plan = suggested_plan(&shipped(), 94);
    let reset = &plan.step("gpu-reset").unwrap().step;
    assert!(reset.needs_approval && reset.releases_gpu);
    assert_eq!(reset.approval_group.as_deref(), Some("reset-path"));
    assert!(
        w.commands
            .contains(&"sudo -n nvidia-smi -r -i 3".to_string()),
        "{:?}",
        w.commands
    );
    assert!(
        !w.commands
            .iter()
            .any(|c| c.contains("scontrol") || c.contains("kubectl")),
        "{:?}",
        w.commands
    );
    assert_eq!(
        w.state,
        [
            "GPU 3 on gpu-node-07 has no row remap failure reported; gpu-node-07 keeps serving jobs",
            "stop-nvml-monitors succeeded on gpu-node-07",
            "GPU 3 on gpu-node-07 was reset to apply its pending row remap",
            "verify-gpu succeeded on gpu-node-07",
            "GPU 3 on gpu-node-07: its row remap is applied (none pending)",
            "start-nvml-monitors succeeded on gpu-node-07",
        ]
    );
}

/// No pending row remap (the check finds no series): the reset path is
/// skipped and nobody is asked to approve anything; the check's failure is
/// not a failed mitigation in the node's state.
#[tokio::test]
async fn no_pending_remap_skips_the_reset_without_asking() {
    let w = walk_with_prometheus(&[]).await;
    let trace = w.trace.join("\n");
    assert!(trace.contains("remap-pending: failed"), "{trace}");
    assert!(!trace.contains("asks approval"), "{trace}");
    for step in [
        "stop-nvml-monitors",
        "gpu-reset",
        "verify-gpu",
        "remap-applied",
    ] {
        assert!(trace.contains(&format!("{step}: skipped: ")), "{trace}");
    }
    assert!(
        trace.contains("gpu-reset: skipped: remap-pending failed"),
        "{trace}"
    );
    assert!(
        !w.commands.iter().any(|c| c.starts_with("sudo")),
        "{:?}",
        w.commands
    );
    assert_eq!(
        w.state,
        ["GPU 3 on gpu-node-07 has no row remap failure reported; gpu-node-07 keeps serving jobs"]
    );
}

/// A pending row remap on a GPU that ran work in the last 5 minutes: the
/// `gpu-idle` check finds it busy, and the reset is neither offered nor run.
#[tokio::test]
async fn busy_gpu_with_pending_remap_is_not_reset() {
    let w =
        walk_with_prometheus(&[pending(), ("gpu-idle", vec![(vec![("gpu", "3")], 97.0)])]).await;
    let trace = w.trace.join("\n");
    assert!(trace.contains("remap-pending: succeeded"), "{trace}");
    assert!(trace.contains("gpu-idle: failed"), "{trace}");
    assert!(!trace.contains("asks approval"), "{trace}");
    assert!(
        trace.contains("stop-nvml-monitors: skipped: gpu-idle failed")
            && trace.contains("gpu-reset: skipped: gpu-idle failed"),
        "{trace}"
    );
    assert!(
        !w.commands.iter().any(|c| c.contains("nvidia-smi -r")),
        "{:?}",
        w.commands
    );
}

/// A row remap failure (`state="failure"`) on the GPU, pending remap or
/// not: the GPU is not reset, and the node's state says it stays drained
/// for hardware replacement (runbook gpu-ecc-remap).
#[tokio::test]
async fn remap_failure_keeps_the_node_drained() {
    let w = walk_with_prometheus(&[
        pending(),
        (
            "remap-failed",
            vec![(vec![("gpu", "3"), ("state", "failure")], 1.0)],
        ),
    ])
    .await;
    let trace = w.trace.join("\n");
    assert!(trace.contains("remap-failed: failed"), "{trace}");
    assert!(!trace.contains("asks approval"), "{trace}");
    assert!(
        trace.contains("gpu-reset: skipped: remap-failed failed"),
        "{trace}"
    );
    assert!(
        !w.commands.iter().any(|c| c.starts_with("sudo")),
        "{:?}",
        w.commands
    );
    assert_eq!(
        w.state,
        ["GPU 3 on gpu-node-07 has a row remap failure (no spare rows): it stays drained for hardware replacement (RMA); runbook gpu-ecc-remap (alert GPURowRemapFailure) drains gpu-node-07, and this run does not reset the GPU"]
    );
}

/// The row-remap checks' queries, as the runbooks render them for GPU 3,
/// evaluated by Prometheus's own engine (`promtool test rules`, its
/// `promql_expr_test`) over the series the agent exports: remap-pending
/// finds the pending flag; gpu-idle finds a busy GPU and a GPU without
/// series (not known to be idle), and nothing for an idle one; remap-failed
/// finds the failure flag; remap-applied finds the pending flag at 0 only;
/// gpu-ecc-remap's remap-not-failed finds the failure flag and a GPU whose
/// series are gone (as right after the agent released NVML for the reset),
/// so neither returns the node to service.
#[test]
#[ignore = "needs promtool: run by .ci/run"]
fn row_remap_checks_select_what_they_say_in_promql() {
    let set = shipped();
    let xid = suggested_plan(&set, 94);
    let ecc = suggested_plan(&set, 64);
    let q = |plan: &RunPlan, step: &str| query_of(plan, step).replace('\'', "''");
    let gpu = r#"instance="10.0.0.7:9949",gpu="3""#;
    // (input series with their values, [(query, expected samples)]).
    type Case<'a> = (
        Vec<(String, &'a str)>,
        Vec<(String, Vec<(String, &'a str)>)>,
    );
    let series =
        |name: &str, extra: &str, values: &'static str| (format!("{name}{{{gpu}{extra}}}"), values);
    let pending_flag = format!("gpu_remapped_rows{{{gpu},state=\"pending\"}}");
    let failure_flag = format!("gpu_remapped_rows{{{gpu},state=\"failure\"}}");
    let bare = format!("{{{gpu}}}");
    let cases: Vec<Case> = vec![
        // Idle, a remap pending, no failure.
        (
            vec![
                series("gpu_up", "", "1x20"),
                series("gpu_utilization_percent", "", "0x20"),
                series("gpu_remapped_rows", ",state=\"pending\"", "1x20"),
                series("gpu_remapped_rows", ",state=\"failure\"", "0x20"),
            ],
            vec![
                (q(&xid, "remap-pending"), vec![(pending_flag.clone(), "1")]),
                (q(&xid, "remap-failed"), vec![]),
                (q(&xid, "gpu-idle"), vec![]),
                (q(&xid, "remap-applied"), vec![]),
                (q(&ecc, "remap-not-failed"), vec![]),
            ],
        ),
        // Busy four minutes ago, with one process; no remap pending
        // (applied), a remap failure.
        (
            vec![
                series("gpu_up", "", "1x20"),
                series("gpu_utilization_percent", "", "0x5 90 0x14"),
                series(
                    "gpu_workload_processes",
                    ",workload_type=\"slurm\",workload=\"42\"",
                    "1x20",
                ),
                series("gpu_remapped_rows", ",state=\"pending\"", "0x20"),
                series("gpu_remapped_rows", ",state=\"failure\"", "1x20"),
            ],
            vec![
                (q(&xid, "remap-pending"), vec![]),
                (q(&xid, "remap-failed"), vec![(failure_flag.clone(), "1")]),
                (
                    q(&xid, "gpu-idle"),
                    vec![
                        (format!("{{{gpu}}}"), "90"),
                        (
                            format!("{{{gpu},workload_type=\"slurm\",workload=\"42\"}}"),
                            "1",
                        ),
                    ],
                ),
                (q(&xid, "remap-applied"), vec![(pending_flag.clone(), "0")]),
                (
                    q(&ecc, "remap-not-failed"),
                    vec![(failure_flag.clone(), "1")],
                ),
            ],
        ),
        // No GPU series at all (lost, or NVML released by the agent).
        (
            vec![(
                "up{instance=\"10.0.0.7:9949\",job=\"gpuops-agent\"}".to_string(),
                "1x20",
            )],
            vec![
                (q(&xid, "remap-pending"), vec![]),
                (q(&xid, "gpu-idle"), vec![(bare.clone(), "1")]),
                (q(&xid, "remap-applied"), vec![]),
                (q(&ecc, "remap-not-failed"), vec![(bare.clone(), "1")]),
            ],
        ),
    ];
    let mut yaml = String::from("rule_files: []\nevaluation_interval: 1m\ntests:\n");
    for (input, exprs) in &cases {
        yaml.push_str("  - interval: 1m\n    input_series:\n");
        for (s, v) in input {
            yaml.push_str(&format!(
                "      - series: '{}'\n        values: '{v}'\n",
                s.replace('\'', "''")
            ));
        }
        yaml.push_str("    promql_expr_test:\n");
        for (expr, samples) in exprs {
            yaml.push_str(&format!("      - expr: '{expr}'\n        eval_time: 10m\n"));
            if samples.is_empty() {
                yaml.push_str("        exp_samples: []\n");
            } else {
                yaml.push_str("        exp_samples:\n");
                for (labels, value) in samples {
                    yaml.push_str(&format!(
                        "          - labels: '{}'\n            value: {value}\n",
                        labels.replace('\'', "''")
                    ));
                }
            }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("remap.test.yml");
    std::fs::write(&file, &yaml).unwrap();
    let out = std::process::Command::new("promtool")
        .args(["test", "rules"])
        .arg(&file)
        .output()
        .expect("promtool is needed (Debian: apt install prometheus)");
    assert!(
        out.status.success(),
        "{}{}\n{yaml}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
