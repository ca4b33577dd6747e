//! `gpuops runbook check` on broken runbooks: every error at once, each with
//! its file, step and key, and a non-zero exit.
// Integration tests run the real binary; only the product is held to the
// no-spawn-outside-exec.rs rule.
#![allow(clippy::disallowed_methods)]

use std::path::Path;
use std::process::Command;

use gpuops::runbook::{parse_runbook, RunbookSet};

fn check_dir(dir: &str) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_gpuops"))
        .args(["runbook", "check", dir])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_reports_every_error_with_file_step_and_key() {
    let (ok, stdout, stderr) = check_dir("tests/fixtures/runbooks/bad");
    assert!(!ok);
    assert_eq!(stdout, "");
    expect_test::expect_file!["../fixtures/runbooks/bad.expected"].assert_eq(&stderr);
}

#[test]
fn check_of_a_missing_or_empty_directory_fails() {
    let (ok, _, stderr) = check_dir("tests/fixtures/runbooks/no-such-dir");
    assert!(!ok);
    assert!(
        stderr.starts_with("tests/fixtures/runbooks/no-such-dir: cannot read runbook directory: "),
        "{stderr}"
    );
    let empty = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_gpuops"))
        .args(["runbook", "check"])
        .arg(empty.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no runbooks (*.yaml) found"));
}

#[test]
fn valid_runbooks_load_alongside_broken_ones() {
    let (set, errors) = RunbookSet::load_dir(Path::new("tests/fixtures/runbooks/bad"));
    // dup.yaml is valid; its twin dup.yml is refused as a duplicate.
    let ids: Vec<&str> = set.runbooks.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["dup"]);
    assert!(errors.0.len() > 20, "{errors}");
}

/// One mistake a line: each must be caught by name.
#[test]
fn single_mistakes_are_named() {
    let base = |step: &str, params: &str| {
        format!(
            "id: t\ntitle: T\nparams:\n{params}\nsteps:\n  - name: s\n    phase: investigate\n{step}\n"
        )
    };
    let p = "  gpu: {pattern: '[0-9]+'}";
    let check = |text: String, expect: &str| {
        let errs = parse_runbook(Path::new("t.yaml"), &text).expect_err(&text);
        let got = errs.to_string();
        assert!(
            got.contains(expect),
            "want {expect:?} in:\n{got}\n---\n{text}"
        );
    };
    check(
        base(
            "    kind: command\n    target: node\n    run: nvidia-smi -i {{gpu}}",
            p,
        ),
        "steps[0] s: run: must be an argv array, not a shell string",
    );
    check(
        base(
            "    kind: command\n    target: node\n    run: [echo, '{{other}}']",
            p,
        ),
        "steps[0] s: run[1]: unknown parameter {{other}} (declare it under params)",
    );
    check(
        base(
            "    kind: command\n    target: node\n    run: [echo, '{{gpu}}']",
            "  gpu: {from_label: gpu}",
        ),
        "params.gpu: pattern: is required",
    );
    check(
        base(
            "    kind: script\n    target: node\n    run: [echo, '{{gpu}}']",
            p,
        ),
        "steps[0] s: kind: unknown kind \"script\"",
    );
    check(
        base(
            "    kind: command\n    target: node\n    timeout: 0s\n    run: [echo, '{{gpu}}']",
            p,
        ),
        "steps[0] s: timeout: 0s is out of range (1s to 1h)",
    );
    check(
        base(
            "    kind: command\n    target: node\n    timeout: 30\n    run: [echo, '{{gpu}}']",
            p,
        ),
        "steps[0] s: timeout: must be a duration string like 30s, got 30",
    );
    check(
        base("    kind: command\n    run: [echo, '{{gpu}}']", p),
        "steps[0] s: target: is required for commands (node or bot)",
    );
    check(
        base(
            "    kind: promql\n    run: [echo]\n    query: 'up{gpu=\"{{gpu}}\"}'",
            p,
        ),
        "steps[0] s: run: not allowed in a promql step",
    );
    check(
        base(
            "    kind: command\n    target: node\n    run: [bash, -c, 'echo {{gpu}}']",
            p,
        ),
        "steps[0] s: run[0]: \"bash\" would run a shell",
    );
    check(
        base(
            "    kind: command\n    target: node\n    run: [env, 'X={{gpu}}', sh]",
            p,
        ),
        "steps[0] s: run[0]: \"env\" would run a shell",
    );
}
