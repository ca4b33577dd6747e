//! The bot's `[store]` section: SQLite (`path`, the default) or PostgreSQL
//! (`url`, with `password_file` and `ca_file`), retention, sync, migrations.

use std::path::PathBuf;
use std::time::Duration;

use crate::config::{positive_secs, read_secret, Reader, Secret, Section};

#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// The SQLite database file.
    pub path: PathBuf,
    /// How long raw webhook payloads, and groups resolved since, are kept.
    pub webhook_retention: Duration,
    /// `full` (default): every commit is fsynced, survives power loss;
    /// `normal`: survives process crashes only, faster on slow disks.
    pub sync: StoreSync,
    /// PostgreSQL instead of SQLite (`postgres://user@host/db?sslmode=...`):
    /// several bot replicas share it. May hold a password, hence a secret.
    pub url: Option<Secret>,
    /// The PostgreSQL password (`password_file`), when not in the URL.
    pub password: Option<Secret>,
    /// PEM certificates that may sign the PostgreSQL server's certificate,
    /// besides the system roots.
    pub ca_file: Option<PathBuf>,
    /// Apply pending schema migrations when the bot starts (default true).
    pub migrate_on_start: bool,
    /// Most PostgreSQL connections one replica opens.
    pub pool_size: usize,
    /// How long connecting to PostgreSQL may take.
    pub connect_timeout: Duration,
}

/// How hard a store commit waits for the disk (`[store] sync`; `store::Sync`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StoreSync {
    /// fsync the WAL on every commit (survives power loss).
    #[default]
    Full,
    /// fsync only at checkpoints (survives process crashes, not power loss).
    Normal,
}

/// Reads `[store]` into `cfg`, reporting every bad key to `r`.
pub fn read_section<'i>(r: &mut Reader<'i>, s: &mut Section<'i>, cfg: &mut StoreConfig) {
    let path = r.get_with(s, "path", |p: PathBuf| {
        if p.as_os_str().is_empty() {
            Err("must not be empty".to_string())
        } else {
            Ok(p)
        }
    });
    let url = r.get_with(s, "url", |u: String| {
        if u.starts_with("postgres://") || u.starts_with("postgresql://") {
            Ok(Secret::new(u))
        } else {
            Err(format!(
                "must be a postgres:// URL, got {}",
                crate::secret::redact_url(&u)
            ))
        }
    });
    if path.is_some() && url.is_some() {
        r.error(
            s,
            "url",
            "set either path (SQLite) or url (PostgreSQL), not both",
        );
    }
    if let Some(v) = path {
        cfg.path = v;
    }
    if url
        .as_ref()
        .is_some_and(|u| crate::secret::conninfo_has_password(u.expose()))
    {
        crate::config::check_inline_secret(r, s, "url", "password_file");
    }
    cfg.url = url;
    cfg.password = read_secret(r, s, "password", "password_file");
    cfg.ca_file = r.get(s, "ca_file");
    if let Some(v) = r.get(s, "migrate_on_start") {
        cfg.migrate_on_start = v;
    }
    if let Some(v) = r.get_with(s, "pool_size", |n: i64| {
        if (1..=256).contains(&n) {
            Ok(n as usize)
        } else {
            Err(format!("must be between 1 and 256, got {n}"))
        }
    }) {
        cfg.pool_size = v;
    }
    if let Some(v) = r.get_with(s, "connect_timeout_secs", positive_secs) {
        cfg.connect_timeout = v;
    }
    if let Some(v) = r.get_with(s, "webhook_retention_secs", positive_secs) {
        cfg.webhook_retention = v;
    }
    if let Some(v) = r.get_with(s, "sync", |v: String| match v.as_str() {
        "full" => Ok(StoreSync::Full),
        "normal" => Ok(StoreSync::Normal),
        _ => Err(format!("must be \"full\" or \"normal\", got {v:?}")),
    }) {
        cfg.sync = v;
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::BotConfig;

    #[test]
    fn url_or_path_not_both_and_a_bad_url_is_shown_without_its_password() {
        let both = "[store]\npath = \"/tmp/x.db\"\nurl = \"postgres://u@db/x\"\n";
        let e = BotConfig::from_str(Path::new("b.toml"), both)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("not both"), "{e}");
        let bad = "[store]\nurl = \"mysql://u:hunter2@db/x\"\n";
        let e = BotConfig::from_str(Path::new("b.toml"), bad)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("postgres://") && !e.contains("hunter2"), "{e}");
        let ok = "[store]\nurl = \"postgres://u:hunter2@db/x\"\nmigrate_on_start = false\npool_size = 4\nconnect_timeout_secs = 2\n";
        let c = BotConfig::from_str(Path::new("b.toml"), ok).unwrap();
        assert!(c.store.url.is_some() && !c.store.migrate_on_start);
        assert_eq!(c.store.pool_size, 4);
        assert!(!format!("{c:?}").contains("hunter2"), "the URL is a secret");
    }
}
