//! Versioned schema migrations, checked in under `migrations/sqlite/` and
//! `migrations/postgres/` and compiled into the binary. Each backend keeps a
//! `schema_migrations(version, name, applied_at)` table; opening a store
//! applies the versions it lacks, in order, each in its own transaction
//! (`[store] migrate_on_start = false` only checks, and `gpuops store
//! migrate` applies). A database newer than this build is refused.

use rusqlite::Connection;

use crate::store::{now, Error, Result};

/// One migration: version, name, SQL.
pub type Migration = (i64, &'static str, &'static str);

pub const SQLITE: &[Migration] = &[
    (
        1,
        "init",
        include_str!("../../migrations/sqlite/0001_init.sql"),
    ),
    (
        2,
        "reports",
        include_str!("../../migrations/sqlite/0002_reports.sql"),
    ),
    (
        3,
        "incidents",
        include_str!("../../migrations/sqlite/0003_incidents.sql"),
    ),
    (
        4,
        "planned_argv",
        include_str!("../../migrations/sqlite/0004_planned_argv.sql"),
    ),
    (
        5,
        "node_states",
        include_str!("../../migrations/sqlite/0005_node_states.sql"),
    ),
];

pub const POSTGRES: &[Migration] = &[
    (
        1,
        "init",
        include_str!("../../migrations/postgres/0001_init.sql"),
    ),
    (
        2,
        "run_owner",
        include_str!("../../migrations/postgres/0002_run_owner.sql"),
    ),
    (
        3,
        "reports",
        include_str!("../../migrations/postgres/0003_reports.sql"),
    ),
    (
        4,
        "incidents",
        include_str!("../../migrations/postgres/0004_incidents.sql"),
    ),
    (
        5,
        "planned_argv",
        include_str!("../../migrations/postgres/0005_planned_argv.sql"),
    ),
    (
        6,
        "node_states",
        include_str!("../../migrations/postgres/0006_node_states.sql"),
    ),
];

/// The newest version this build knows.
pub fn latest(list: &[Migration]) -> i64 {
    list.iter().map(|m| m.0).max().unwrap_or(0)
}

const TABLE_SQLITE: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)";

/// Refuses a database whose schema is newer than this build.
pub fn check_not_newer(current: i64, list: &[Migration]) -> Result<()> {
    if current > latest(list) {
        return Err(Error::Schema(format!(
            "the database is at schema version {current}, newer than this gpuops (version {}); upgrade gpuops",
            latest(list)
        )));
    }
    Ok(())
}

fn sqlite_version(c: &Connection) -> Result<i64> {
    c.execute_batch(TABLE_SQLITE)?;
    Ok(c.query_row(
        "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
        [],
        |r| r.get(0),
    )?)
}

/// Applies the SQLite migrations this database lacks; returns how many.
pub fn sqlite_apply(c: &Connection) -> Result<usize> {
    let current = sqlite_version(c)?;
    check_not_newer(current, SQLITE)?;
    let mut n = 0;
    for (version, name, sql) in SQLITE.iter().filter(|m| m.0 > current) {
        c.execute_batch("BEGIN IMMEDIATE")?;
        let applied = c.execute_batch(sql).and_then(|()| {
            c.execute(
                "INSERT INTO schema_migrations(version, name, applied_at) VALUES (?1, ?2, ?3)",
                rusqlite::params![version, name, now()],
            )
        });
        match applied {
            Ok(_) => c.execute_batch("COMMIT")?,
            Err(e) => {
                let _ = c.execute_batch("ROLLBACK");
                return Err(Error::Schema(format!(
                    "sqlite migration {version:04}_{name} failed: {e}"
                )));
            }
        }
        n += 1;
    }
    Ok(n)
}

/// Refuses a SQLite database that lacks migrations (`migrate_on_start = false`).
pub fn sqlite_check(c: &Connection) -> Result<()> {
    let current = sqlite_version(c)?;
    check_not_newer(current, SQLITE)?;
    if current < latest(SQLITE) {
        return Err(Error::Schema(format!(
            "the database is at schema version {current}, this gpuops needs {}; run `gpuops store migrate` (or set [store] migrate_on_start = true)",
            latest(SQLITE)
        )));
    }
    Ok(())
}
