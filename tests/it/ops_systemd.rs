//! The shipped systemd units meet their exposure budgets
//! (`systemd-analyze security --offline=true`) and keep the settings the
//! binary relies on (notify + watchdog, credentials, state directory).
//! Reads the unit files only; starts nothing.
#![allow(clippy::disallowed_methods)] // integration tests spawn the real binary and external tools

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The overall exposure `systemd-analyze security --offline=true` gives `unit`,
/// after checking that systemd understood every line of it.
fn exposure(unit: &Path) -> f64 {
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(unit)
        .output()
        .unwrap_or_else(|e| panic!("cannot run systemd-analyze: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    for bad in [
        "Unknown key",
        "Unknown section",
        "Failed to parse",
        "ignoring",
    ] {
        assert!(
            !stderr.contains(bad),
            "{}: systemd did not accept a line:\n{stderr}",
            unit.display()
        );
    }
    let line = stdout
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure level in:\n{stdout}\n{stderr}"));
    let value = line
        .split(':')
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok());
    value.unwrap_or_else(|| panic!("cannot read the score in {line:?}"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn has_line(text: &str, line: &str) -> bool {
    text.lines().any(|l| l.trim() == line)
}

#[test]
fn agent_unit_scores_at_most_3_5() {
    let score = exposure(&repo().join("systemd/gpuops-agent.service"));
    eprintln!("gpuops-agent.service exposure {score}");
    assert!(score <= 3.5, "gpuops-agent.service exposure {score} > 3.5");
}

#[test]
fn agent_unit_with_privileged_runbook_drop_in_scores_at_most_3_5() {
    // systemd merges a drop-in after the unit: concatenating the two files gives
    // the same settings (an empty `SystemCallFilter=` resets the list as it does there).
    let dir = tempfile::tempdir().expect("tempdir");
    let merged = dir.path().join("gpuops-agent.service");
    let text = read(&repo().join("systemd/gpuops-agent.service"))
        + "\n"
        + &read(&repo().join("packaging/privileged/gpuops-agent-privileged.conf"));
    std::fs::write(&merged, text).expect("write merged unit");
    let score = exposure(&merged);
    eprintln!("gpuops-agent.service + privileged drop-in exposure {score}");
    assert!(score <= 3.5, "agent with privileged drop-in: {score} > 3.5");
}

#[test]
fn bot_unit_scores_at_most_2_5() {
    let score = exposure(&repo().join("systemd/gpuops-bot.service"));
    eprintln!("gpuops-bot.service exposure {score}");
    assert!(score <= 2.5, "gpuops-bot.service exposure {score} > 2.5");
}

#[test]
fn agent_unit_keeps_what_the_binary_relies_on() {
    let unit = read(&repo().join("systemd/gpuops-agent.service"));
    for line in [
        "Type=notify",
        "WatchdogSec=30s",
        "User=gpuops",
        "AmbientCapabilities=CAP_SYSLOG",
        "CapabilityBoundingSet=CAP_SYSLOG",
        "NoNewPrivileges=yes",
        "ProtectHome=read-only",
        "ProtectProc=default",
        "DeviceAllow=/dev/kmsg r",
        "DeviceAllow=char-nvidia-frontend rw",
        "ExecStart=/usr/bin/gpuops agent --config /etc/gpuops/agent.toml",
    ] {
        assert!(has_line(&unit, line), "agent unit lacks {line:?}");
    }
    // The kernel log must stay readable: ProtectKernelLogs would hide /dev/kmsg.
    assert!(!unit.contains("ProtectKernelLogs=yes"));
    // PrivateUsers would confine CAP_SYSLOG to a user namespace, useless for kmsg.
    assert!(!unit.contains("PrivateUsers=yes"));
}

#[test]
fn bot_unit_uses_a_dynamic_user_and_credentials() {
    let unit = read(&repo().join("systemd/gpuops-bot.service"));
    for line in [
        "DynamicUser=yes",
        "StateDirectory=gpuops",
        "ExecStart=/usr/bin/gpuops bot --config /etc/gpuops/bot.toml",
        "LoadCredential=webhook-token:gpuops.webhook-token",
        "LoadCredential=slack-bot-token:gpuops.slack-bot-token",
        "LoadCredential=slack-signing-secret:gpuops.slack-signing-secret",
        "LoadCredential=discord-bot-token:gpuops.discord-bot-token",
        "LoadCredential=exec-key:gpuops.exec-key",
        "LoadCredential=agents-password:gpuops.agents-password",
        "LoadCredential=agents-client-key:gpuops.agents-client-key",
        "LoadCredential=postgres-password:gpuops.postgres-password",
        "LoadCredential=pagerduty-webhook-secret:gpuops.pagerduty-webhook-secret",
        "LoadCredential=pagerduty-routing-key:gpuops.pagerduty-routing-key",
        "LoadCredential=smtp-password:gpuops.smtp-password",
    ] {
        assert!(has_line(&unit, line), "bot unit lacks {line:?}");
    }
}

#[test]
fn shipped_configs_name_the_credentials_the_units_load() {
    // The default configs refer to credentials by the ids the units give them.
    let agent = read(&repo().join("packaging/agent.toml"));
    // The agent holds only the bot's public key: no credential at all.
    assert!(agent.contains("public_key_files = [\"/etc/gpuops/exec.pub\"]"));
    assert!(!read(&repo().join("systemd/gpuops-agent.service")).contains("LoadCredential="));
    let bot = read(&repo().join("packaging/bot.toml"));
    for id in [
        "webhook-token",
        "slack-bot-token",
        "slack-signing-secret",
        "discord-bot-token",
        "exec-key",
        "agents-password",
        "agents-client-key",
        "postgres-password",
        "pagerduty-webhook-secret",
        "pagerduty-routing-key",
        "smtp-password",
    ] {
        assert!(
            bot.contains(&format!("\"{id}\"")),
            "bot.toml never names {id}"
        );
    }
}

#[test]
fn packaged_agent_config_parses() {
    let path = repo().join("packaging/agent.toml");
    if let Err(e) = gpuops::config::AgentConfig::from_file(&path) {
        panic!("{e}");
    }
}
