//! `gpuops store migrate` and `gpuops store copy`: the store's schema and
//! the move from a single-node SQLite install to PostgreSQL. Errors name
//! what failed (the file, the database without its password, the table).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;

use crate::cli::{StoreCommand, StoreCopyArgs, StoreMigrateArgs};
use crate::config::bot::BotConfig;
use crate::store::{self, pg};

pub fn run(cmd: StoreCommand) -> anyhow::Result<ExitCode> {
    crate::telemetry::init("gpuops-store", false, "warn");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    match cmd {
        StoreCommand::Migrate(args) => rt.block_on(migrate(args)),
        StoreCommand::Copy(args) => rt.block_on(copy(args)),
    }
}

fn config(path: &Option<PathBuf>) -> anyhow::Result<BotConfig> {
    Ok(match path {
        Some(p) => BotConfig::from_file(p)?,
        None => BotConfig::default(),
    })
}

async fn migrate(args: StoreMigrateArgs) -> anyhow::Result<ExitCode> {
    let cfg = config(&args.config)?;
    match &cfg.store.url {
        Some(_) => {
            let settings = pg::Settings::from_config(&cfg.store)?;
            let db = pg::Pg::connect(settings).await?;
            let n = db
                .migrate()
                .await
                .with_context(|| format!("cannot migrate {}", db.describe()))?;
            println!(
                "{}: {n} migration(s) applied, schema version {}",
                db.describe(),
                store::migrate::latest(store::migrate::POSTGRES)
            );
        }
        None => {
            let path = cfg.store.path.clone();
            let n = tokio::task::spawn_blocking(move || -> anyhow::Result<usize> {
                // Opening applies them; count what was missing first.
                let before = schema_version_sqlite(&path)?;
                store::Store::open_with(&path, cfg.store.sync)
                    .with_context(|| format!("cannot migrate {}", path.display()))?;
                Ok(
                    usize::try_from(store::migrate::latest(store::migrate::SQLITE) - before)
                        .unwrap_or(0),
                )
            })
            .await
            .context("store task failed")??;
            println!(
                "{}: {n} migration(s) applied, schema version {}",
                cfg.store.path.display(),
                store::migrate::latest(store::migrate::SQLITE)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The version a SQLite file records (0: new, or from before migrations).
fn schema_version_sqlite(path: &std::path::Path) -> anyhow::Result<i64> {
    if !path.exists() {
        return Ok(0);
    }
    let c = rusqlite::Connection::open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let v: Option<i64> = c
        .query_row("SELECT MAX(version) FROM schema_migrations", [], |r| {
            r.get(0)
        })
        .unwrap_or(None);
    Ok(v.unwrap_or(0))
}

async fn copy(args: StoreCopyArgs) -> anyhow::Result<ExitCode> {
    let cfg = config(&args.config)?;
    // A password on the command line is in `ps` and shell history.
    for (flag, value) in [("--from", Some(&args.from)), ("--to", args.to.as_ref())] {
        if let Some(v) = value {
            if crate::secret::conninfo_has_password(v) {
                anyhow::bail!(
                    "{flag} {} holds a password, which would show in `ps` and the shell history: \
                     leave it out and give it with --password-file, [store] password_file or a PGPASSFILE",
                    crate::secret::redact_url(v)
                );
            }
        }
    }
    let from = PathBuf::from(args.from.strip_prefix("sqlite:").unwrap_or(&args.from));
    if !from.exists() {
        anyhow::bail!("--from: no SQLite store at {}", from.display());
    }
    let mut store_cfg = cfg.store.clone();
    if let Some(url) = &args.to {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            anyhow::bail!(
                "--to must be a postgres:// URL, got {}",
                crate::secret::redact_url(url)
            );
        }
        store_cfg.url = Some(crate::secret::Secret::new(url.clone()));
    }
    if let Some(file) = &args.password_file {
        let password = crate::secret::load_secret_file(file)
            .map_err(|e| anyhow::anyhow!("--password-file {}: {e}", file.display()))?;
        store_cfg.password = Some(password);
    }
    if store_cfg.url.is_none() {
        anyhow::bail!(
            "no PostgreSQL to copy to: pass --to postgres://... or a --config with [store] url"
        );
    }
    let settings = pg::Settings::from_config(&store_cfg)?;
    let db = pg::Pg::connect(settings).await?;
    let report = store::copy::sqlite_to_postgres(&from, &db)
        .await
        .with_context(|| format!("cannot copy {} to {}", from.display(), db.describe()))?;
    for (table, rows) in &report {
        println!("{table}: {rows} row(s)");
    }
    println!("copied {} to {}", from.display(), db.describe());
    Ok(ExitCode::SUCCESS)
}
