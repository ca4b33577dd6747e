//! `gpuops discord register --config FILE`: the real binary registers the
//! `/gpuops` slash command through serenity against the local fake Discord
//! API, and says clearly why when it cannot. The bot token never appears in
//! what it prints.
#![allow(clippy::disallowed_methods)] // tests spawn the real binary

use crate::support;

use std::path::Path;

use support::{gpuops, FakeApi, Scripted};

const TOKEN: &str = "discord-token-s3cret";

fn config(dir: &Path, discord: &FakeApi, application_id: Option<&str>) -> std::path::PathBuf {
    let app = application_id
        .map(|a| format!("application_id = \"{a}\"\n"))
        .unwrap_or_default();
    let path = dir.join("bot.toml");
    std::fs::write(
        &path,
        format!(
            "[store]\npath = \"{db}\"\n[discord]\nbot_token = \"{TOKEN}\"\n{app}api_url = \"{api}\"\n",
            db = dir.join("bot.db").display(),
            api = discord.url(),
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &path,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600),
    )
    .unwrap(); // holds inline secrets
    path
}

/// Runs `gpuops discord register --config cfg`: exit code, stdout, stderr.
async fn register(cfg: &Path) -> (i32, String, String) {
    let out = tokio::process::Command::new(gpuops())
        .args(["discord", "register", "--config"])
        .arg(cfg)
        .env_remove("GPUOPS_BOT_CONFIG")
        .output()
        .await
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    for text in [&stdout, &stderr] {
        assert!(!text.contains(TOKEN), "the bot token leaked: {text}");
    }
    (out.status.code().unwrap_or(-1), stdout, stderr)
}

#[tokio::test(flavor = "multi_thread")]
async fn discord_register_puts_the_gpuops_command_for_the_application() {
    let discord = FakeApi::discord().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &discord, Some("223456789012345678"));
    let (code, stdout, stderr) = register(&cfg).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout
            .contains("registered 1 global command(s) for Discord application 223456789012345678"),
        "{stdout}"
    );
    assert!(stdout.contains("/gpuops (id "), "{stdout}");

    let reqs = discord.requests();
    assert_eq!(reqs.len(), 1, "{reqs:#?}");
    let r = &reqs[0];
    assert_eq!(
        (r.method.as_str(), r.path.as_str()),
        ("PUT", "/api/v10/applications/223456789012345678/commands")
    );
    assert_eq!(r.authorization, format!("Bot {TOKEN}"));
    let commands = r.body.as_array().expect("a list of commands");
    assert_eq!(commands.len(), 1, "{}", r.raw);
    let c = &commands[0];
    assert_eq!(c["name"], "gpuops");
    assert_eq!(c["type"], 1, "a slash (chat input) command");
    assert_eq!(
        c["description"],
        "GPU cluster operations: alerts, silences, runbooks"
    );
    let options = c["options"].as_array().unwrap();
    assert_eq!(options.len(), 1, "{}", r.raw);
    assert_eq!(
        (
            &options[0]["name"],
            &options[0]["type"],
            &options[0]["required"]
        ),
        (
            &serde_json::json!("command"),
            &serde_json::json!(3),
            &serde_json::json!(false)
        ),
        "one optional string option holding the command text"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn discord_register_without_application_id_says_so_and_sends_nothing() {
    let discord = FakeApi::discord().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &discord, None);
    let (code, stdout, stderr) = register(&cfg).await;
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(
        stderr.contains("[discord] application_id is not set"),
        "{stderr}"
    );
    assert!(discord.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn discord_register_with_a_bad_token_reports_the_http_status() {
    let discord = FakeApi::discord().await;
    discord.script([Scripted::new(
        401,
        serde_json::json!({ "message": "401: Unauthorized", "code": 0 }),
    )]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &discord, Some("42"));
    let (code, stdout, stderr) = register(&cfg).await;
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(
        stderr.contains("PUT /api/v10/applications/42/commands: HTTP 401: 401: Unauthorized"),
        "{stderr}"
    );
    assert!(stderr.contains("bot_token"), "{stderr}");
    assert_eq!(discord.requests().len(), 1);
}
