//! The node build (issue 23): `--no-default-features --features agent`
//! must hold none of the bot's crates. The dependency tree is read with
//! `cargo tree --offline` (the lock file and the local registry only); the
//! same matcher run on the full build's tree must find them, so a tree that
//! could not be read or a renamed crate does not pass by saying nothing.

use std::path::PathBuf;
use std::process::Command;

/// Crates only the bot needs: PostgreSQL and SQLite stores, SMTP, charts
/// and their font rasterizer and PNG encoder, the Slack and Discord clients,
/// time zones and cron schedules (reports, digests, escalation).
const BOT_CRATES: &[&str] = &[
    "tokio-postgres",
    "tokio-postgres-rustls",
    "deadpool",
    "deadpool-postgres",
    "rusqlite",
    "libsqlite3-sys",
    "lettre",
    "plotters",
    "plotters-bitmap",
    "ab_glyph",
    "ab_glyph_rasterizer",
    "png",
    "serenity",
    "slack-morphism",
    "chrono-tz",
    "cron",
    "rustls-native-certs",
];

/// Whether a crate name is one of the bot's (`postgres-*` covers
/// postgres-protocol and postgres-types, `deadpool-*` the pool's parts).
fn is_bot_crate(name: &str) -> bool {
    BOT_CRATES.contains(&name) || name.starts_with("postgres-") || name.starts_with("deadpool-")
}

/// `cargo tree` of the normal (non-dev, non-build) dependencies, one crate
/// per line without the tree's drawing: `name vX.Y.Z [(features)]`.
fn tree(features: &[&str]) -> Vec<String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .args([
            "tree",
            "--offline",
            "--locked",
            "-e",
            "normal",
            "--prefix",
            "none",
        ])
        .args(features)
        .output()
        .expect("run cargo tree");
    assert!(
        out.status.success(),
        "cargo tree {features:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// The bot crates a tree names, sorted, each once.
fn bot_crates_in(tree: &[String]) -> Vec<String> {
    let mut found: Vec<String> = tree
        .iter()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| is_bot_crate(name))
        .map(str::to_string)
        .collect();
    found.sort();
    found.dedup();
    found
}

#[test]
fn agent_build_dependency_tree_has_no_bot_crates() {
    let agent = tree(&["--no-default-features", "--features", "agent"]);
    let has = |name: &str| agent.iter().any(|l| l.starts_with(&format!("{name} v")));
    // The tree was read: the crate itself and the agent's own crates are in it.
    assert!(
        has("gpuops"),
        "no gpuops in the agent tree:\n{}",
        agent.join("\n")
    );
    for name in ["nvml-wrapper", "procfs", "axum", "ed25519-dalek", "bcrypt"] {
        assert!(has(name), "the agent build lost {name}");
    }
    let found = bot_crates_in(&agent);
    assert!(
        found.is_empty(),
        "the agent build (--no-default-features --features agent) holds the bot's crates {found:?}"
    );

    // The matcher finds them where they are: in the full build.
    let full = bot_crates_in(&tree(&[]));
    for name in [
        "rusqlite",
        "tokio-postgres",
        "lettre",
        "plotters",
        "serenity",
        "slack-morphism",
        "chrono-tz",
        "cron",
    ] {
        assert!(
            full.iter().any(|f| f == name),
            "{name} not found in the full build's tree: {full:?}"
        );
    }
}
