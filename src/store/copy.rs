//! `gpuops store copy`: moves every table of a SQLite store into an empty
//! (migrated) PostgreSQL store, keeping ids, then moves the identity
//! sequences past the copied ids. One PostgreSQL transaction: a failed copy
//! leaves nothing behind.

use rusqlite::types::ValueRef;
use tokio_postgres::types::{IsNull, ToSql, Type};

use crate::store::pg::Pg;
use crate::store::{Error, Result};

/// Every table, in copy order, with its columns.
pub const TABLES: &[(&str, &[&str])] = &[
    (
        "webhooks",
        &["id", "received_at", "group_id", "duplicate", "payload"],
    ),
    (
        "alert_groups",
        &[
            "id",
            "group_key",
            "receiver",
            "status",
            "tier",
            "rev",
            "state_hash",
            "recent_hashes",
            "state",
            "first_seen",
            "updated_at",
        ],
    ),
    (
        "messages",
        &[
            "group_id",
            "destination",
            "channel",
            "message_id",
            "rev",
            "posted_at",
            "updated_at",
        ],
    ),
    (
        "outbox",
        &[
            "id",
            "group_id",
            "destination",
            "kind",
            "rev",
            "body",
            "attempts",
            "created_at",
            "next_attempt_at",
            "last_error",
        ],
    ),
    (
        "dead_letters",
        &[
            "id",
            "outbox_id",
            "group_id",
            "destination",
            "kind",
            "body",
            "attempts",
            "error",
            "at",
        ],
    ),
    ("acks", &["group_id", "who", "at"]),
    (
        "audit",
        &["id", "at", "who", "action", "params", "target", "outcome"],
    ),
    ("replay_keys", &["key", "seen_at"]),
    (
        "escalations",
        &[
            "group_id",
            "dest",
            "step",
            "steps",
            "due_at",
            "state",
            "started_at",
        ],
    ),
    ("digest_slots", &["slot", "claimed_at", "late", "groups"]),
    (
        "report_slots",
        &["name", "slot", "claimed_at", "late", "outcome"],
    ),
    (
        "incident_subjects",
        &["subject", "incident_group_id", "last_at"],
    ),
    (
        "group_incidents",
        &["group_id", "incident_group_id", "linked_at"],
    ),
    (
        "node_states",
        &[
            "node",
            "state",
            "since",
            "out_since",
            "reason",
            "alert",
            "xid",
            "step",
            "run",
            "by_person",
            "gpus",
            "group_id",
            "updated_at",
            "is_repeat",
            "reminded_at",
        ],
    ),
    (
        "node_transitions",
        &[
            "id",
            "node",
            "from_state",
            "to_state",
            "at",
            "reason",
            "alert",
            "xid",
            "step",
            "run",
            "by_person",
            "gpus",
            "group_id",
            "out_since",
            "lost_gpu_seconds",
        ],
    ),
    (
        "chat_runs",
        &[
            "id",
            "runbook",
            "only_steps",
            "given",
            "labels",
            "group_id",
            "requester",
            "requester_name",
            "requester_role",
            "status",
            "next_step",
            "results",
            "expires_at",
            "decided_by",
            "planned",
            "created_at",
            "updated_at",
        ],
    ),
    (
        "chat_run_steps",
        &[
            "run_id",
            "seq",
            "step",
            "status",
            "exit_code",
            "duration_secs",
            "output",
            "truncated",
            "approved_by",
            "at",
        ],
    ),
];

/// Tables whose `id` is an identity (its sequence is reset after a copy).
const IDENTITIES: &[&str] = &[
    "webhooks",
    "alert_groups",
    "outbox",
    "dead_letters",
    "audit",
    "node_transitions",
];

/// `table` if it is one of the store's tables (names are never taken from
/// outside data into SQL otherwise).
pub fn known_table(table: &'static str) -> Result<&'static str> {
    if TABLES.iter().any(|(t, _)| *t == table) {
        Ok(table)
    } else {
        Err(Error::Task(format!("no table {table} in the store")))
    }
}

/// One SQLite value, owned, as PostgreSQL takes it.
#[derive(Debug)]
enum Value {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

/// Written as the target column's type wants (SQLite's types are loose).
impl ToSql for Value {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> std::result::Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Value::Null => Ok(IsNull::Yes),
            Value::Int(v) if *ty == Type::FLOAT8 => (*v as f64).to_sql(ty, out),
            Value::Int(v) => v.to_sql(ty, out),
            Value::Real(v) if *ty == Type::INT8 => (*v as i64).to_sql(ty, out),
            Value::Real(v) => v.to_sql(ty, out),
            Value::Text(v) if *ty == Type::BYTEA => v.as_bytes().to_sql(ty, out),
            Value::Text(v) => v.to_sql(ty, out),
            Value::Blob(v) if *ty == Type::TEXT => {
                String::from_utf8_lossy(v).into_owned().to_sql(ty, out)
            }
            Value::Blob(v) => v.to_sql(ty, out),
        }
    }

    fn accepts(ty: &Type) -> bool {
        [Type::INT8, Type::FLOAT8, Type::TEXT, Type::BYTEA].contains(ty)
    }

    tokio_postgres::types::to_sql_checked!();
}

/// Reads a whole table from SQLite (blocking).
fn read_table(c: &rusqlite::Connection, table: &str, columns: &[&str]) -> Result<Vec<Vec<Value>>> {
    let exists: i64 = c.query_row(
        "SELECT COUNT(*) FROM sqlite_master WHERE type='table' AND name=?1",
        [table],
        |r| r.get(0),
    )?;
    if exists == 0 {
        return Ok(Vec::new());
    }
    let mut st = c.prepare(&format!("SELECT {} FROM {table}", columns.join(", ")))?;
    let rows = st.query_map([], |r| {
        (0..columns.len())
            .map(|i| {
                Ok(match r.get_ref(i)? {
                    ValueRef::Null => Value::Null,
                    ValueRef::Integer(v) => Value::Int(v),
                    ValueRef::Real(v) => Value::Real(v),
                    ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
                    ValueRef::Blob(b) => Value::Blob(b.to_vec()),
                })
            })
            .collect::<rusqlite::Result<Vec<_>>>()
    })?;
    Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
}

/// What a copy moved: rows per table.
pub type CopyReport = Vec<(&'static str, usize)>;

/// Copies the SQLite database at `from` into `to` (migrated, and empty:
/// a target that already holds alert groups or outbox rows is refused).
pub async fn sqlite_to_postgres(from: &std::path::Path, to: &Pg) -> Result<CopyReport> {
    if !from.exists() {
        return Err(Error::Task(format!(
            "no SQLite store at {}",
            from.display()
        )));
    }
    let path = from.to_path_buf();
    let data = tokio::task::spawn_blocking(move || -> Result<Vec<Vec<Vec<Value>>>> {
        let c = rusqlite::Connection::open_with_flags(
            &path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .map_err(|source| Error::Open {
            path: path.clone(),
            source,
        })?;
        TABLES
            .iter()
            .map(|(t, cols)| read_table(&c, t, cols))
            .collect()
    })
    .await
    .map_err(|e| Error::Task(e.to_string()))??;
    to.migrate().await?;
    let mut c = to.client().await?;
    let tx = c.transaction().await?;
    for table in ["alert_groups", "outbox"] {
        let row = tx
            .query_one(&format!("SELECT COUNT(*)::BIGINT FROM {table}"), &[])
            .await?;
        let n: i64 = crate::store::pg::get(&row, 0)?;
        if n > 0 {
            return Err(Error::Task(format!(
                "{} already has {n} rows in {table}; copy only into an empty database",
                to.describe()
            )));
        }
    }
    let mut report = Vec::new();
    for ((table, columns), rows) in TABLES.iter().zip(&data) {
        let placeholders: Vec<String> = (1..=columns.len()).map(|i| format!("${i}")).collect();
        let overriding = if IDENTITIES.contains(table) {
            " OVERRIDING SYSTEM VALUE"
        } else {
            ""
        };
        let sql = format!(
            "INSERT INTO {table} ({}){overriding} VALUES ({})",
            columns.join(", "),
            placeholders.join(", ")
        );
        let st = tx.prepare(&sql).await?;
        for row in rows {
            let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
                row.iter().map(|v| v as _).collect();
            tx.execute(&st, &params).await.map_err(|e| {
                Error::Task(format!("copying a row of {table}: {}", Error::from(e)))
            })?;
        }
        report.push((*table, rows.len()));
    }
    for table in IDENTITIES {
        tx.execute(
            &format!(
                "SELECT setval(pg_get_serial_sequence('{table}', 'id'),
                               COALESCE((SELECT MAX(id) FROM {table}), 0) + 1, false)"
            ),
            &[],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(report)
}
