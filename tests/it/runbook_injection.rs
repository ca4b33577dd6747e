//! Parameter injection attempts: each is refused by a pattern (or by the
//! universal limits), or stays inert inside a single argv element when a
//! runbook's pattern is permissive. Checked through the real process runner.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use gpuops::runbook::engine::{self, Rendered};
use gpuops::runbook::exec::{CommandRunner, CommandSpec, ProcessRunner};
use gpuops::runbook::{parse_runbook, Runbook};

/// `gpu` has a strict pattern, `text` a permissive one.
fn runbook() -> Runbook {
    parse_runbook(
        Path::new("inject.yaml"),
        r#"
id: inject
title: Injection target
params:
  gpu: { pattern: '[0-9]{1,2}', from_label: gpu }
  node:
    pattern: '(?P<value>[A-Za-z0-9][A-Za-z0-9-]{0,62})(?:\.[A-Za-z0-9.-]+)?(?::[0-9]{1,5})?'
    from_label: instance
    default: n1
  text: { pattern: '.{1,200}', default: hello }
steps:
  - name: reset
    phase: mitigate
    kind: command
    target: node
    needs_approval: true
    run: [printf, '%s|', -i, "{{gpu}}", "nodename={{node}}", "{{text}}"]
  - name: q
    phase: investigate
    kind: promql
    query: 'up{instance="{{node}}",x="{{text}}"}'
  - name: h
    phase: escalate
    kind: http
    method: POST
    url: "http://pager.example/{{text}}?n={{node}}"
    body: '{"text": "{{text}}"}'
"#,
    )
    .unwrap()
}

fn given(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Expect a refusal naming `param`.
fn refused(pairs: &[(&str, &str)], param: &str) {
    let err = engine::plan(&runbook(), &given(pairs), &BTreeMap::new())
        .expect_err(&format!("{pairs:?} should be refused"));
    assert!(
        err.0.iter().any(|e| e.param == param),
        "{pairs:?}: refused, but not for {param}: {err}"
    );
}

fn argv(pairs: &[(&str, &str)]) -> Vec<String> {
    let plan = engine::plan(&runbook(), &given(pairs), &BTreeMap::new()).unwrap();
    match &plan.steps[0].rendered {
        Rendered::Command { argv } => argv.clone(),
        other => panic!("{other:?}"),
    }
}

#[test]
fn strict_patterns_refuse_injection() {
    for bad in [
        "0; rm -rf /",
        "$(reboot)",
        "`reboot`",
        "0\nreboot",
        "0 1",
        "--help",
        "-r",
        "{{text}}",
        "３", // full-width digit
        "0\u{0}",
        "",
        "123",
    ] {
        refused(&[("gpu", bad)], "gpu");
    }
    for bad in [
        "--output-file=/etc/passwd",
        "-n1",
        "n1;reboot",
        "n1 state=resume",
        "n1\u{202e}",
        "n1:99999999",
        "../../etc",
    ] {
        refused(&[("gpu", "0"), ("node", bad)], "node");
    }
}

#[test]
fn universal_limits_hold_even_for_permissive_patterns() {
    for bad in [
        "a\nb",
        "a\rb",
        "a\tb",
        "a\u{0}b",
        "a\u{202e}b",
        "a\u{200b}b",
    ] {
        refused(&[("gpu", "0"), ("text", bad)], "text");
    }
    refused(&[("gpu", "0"), ("text", &"x".repeat(257))], "text");
    refused(&[("gpu", "0"), ("nope", "1")], "nope");
}

#[test]
fn alert_labels_are_held_to_the_same_patterns() {
    let labels = given(&[("gpu", "0 -r"), ("instance", "n1;reboot:9949")]);
    let err = engine::plan(&runbook(), &BTreeMap::new(), &labels).unwrap_err();
    let params: Vec<&str> = err.0.iter().map(|e| e.param.as_str()).collect();
    assert_eq!(params, ["gpu", "node"], "{err}");
}

#[test]
fn permissive_values_stay_one_inert_argv_element() {
    for (value, _why) in [
        ("; rm -rf /", "shell separator"),
        ("$(touch /tmp/gpuops-pwned)", "command substitution"),
        ("`id`", "backticks"),
        ("--option=smuggled -r", "option smuggling"),
        ("{{gpu}} {{node}}", "placeholders inside a value"),
        ("ünïcödé ☃ 𝔤𝔭𝔲", "unicode"),
        ("a\"b'c\\d", "quotes"),
        ("* ? [a] ~", "globs"),
    ] {
        let a = argv(&[("gpu", "7"), ("text", value)]);
        assert_eq!(a.len(), 6, "{value:?} changed the argv length: {a:?}");
        assert_eq!(a[3], "7");
        assert_eq!(a[4], "nodename=n1");
        assert_eq!(a[5], value, "substituted once, verbatim");
    }
}

#[tokio::test]
async fn real_process_sees_values_literally() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("pwned");
    let value = format!(
        "$(touch {}); touch {} `x`",
        marker.display(),
        marker.display()
    );
    let a = argv(&[("gpu", "7"), ("text", &value)]);
    let out = ProcessRunner
        .run(&CommandSpec {
            argv: a,
            timeout: Duration::from_secs(10),
            output_cap: 4096,
        })
        .await
        .unwrap();
    assert_eq!(out.exit_code, Some(0));
    assert_eq!(out.stdout, format!("-i|7|nodename=n1|{value}|"));
    assert!(!marker.exists(), "nothing was interpreted by a shell");
}

#[test]
fn url_promql_and_body_values_are_escaped() {
    let plan = engine::plan(
        &runbook(),
        &given(&[("gpu", "1"), ("text", "a\"}/x?y=1&z#\\")]),
        &BTreeMap::new(),
    )
    .unwrap();
    assert_eq!(
        plan.steps[1].rendered,
        Rendered::Promql {
            query: r#"up{instance="n1",x="a\"}/x?y=1&z#\\"}"#.into()
        }
    );
    assert_eq!(
        plan.steps[2].rendered,
        Rendered::Http {
            method: gpuops::runbook::HttpMethod::Post,
            url: "http://pager.example/a%22%7D%2Fx%3Fy%3D1%26z%23%5C?n=n1".into(),
            body: Some(r#"{"text": "a\"}/x?y=1&z#\\"}"#.into()),
        }
    );
    let body: serde_json::Value = match &plan.steps[2].rendered {
        Rendered::Http { body: Some(b), .. } => serde_json::from_str(b).unwrap(),
        _ => unreachable!(),
    };
    assert_eq!(body["text"], "a\"}/x?y=1&z#\\");
}
