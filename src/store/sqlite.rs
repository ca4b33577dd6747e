//! The SQLite backend: one writer thread with group commit, a reader
//! connection, and the SQL of the core tables (webhooks, groups, messages,
//! outbox rows, acks). The other tables' SQLite SQL is in `audit.rs`,
//! `outbox.rs`, `paging.rs` and `runs.rs` beside this file.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};

use crate::message::Ack;
use crate::store::{
    now, Correlation, Error, GroupRecord, GroupUpdate, Incident, IngestResult, MessageRecord,
    Result, Sync, CALL_DEADLINE, KIND_NOTICE, KIND_REPLY, RECENT_HASHES,
};
/// A handle to the database; cheap to clone.
///
/// Writes go to one writer thread that commits whatever queued up while the
/// previous commit was syncing in a single transaction (group commit: one
/// fsync for many webhooks), each job inside its own savepoint so one
/// failing job does not undo the others. Reads use a separate connection
/// (WAL readers do not block the writer).
#[derive(Clone)]
pub struct Sqlite {
    writer: std::sync::mpsc::Sender<Job>,
    reader: Arc<Mutex<Connection>>,
    path: PathBuf,
}

/// Called after the batch's COMMIT with its error, if any.
type Done = Box<dyn FnOnce(Option<&str>) + Send>;
/// Runs on the writer thread inside the batch transaction (or is told why not).
type Job = Box<dyn FnOnce(std::result::Result<&Connection, &str>) -> Done + Send>;

/// A batch taking longer than this is logged.
const SLOW_COMMIT: Duration = Duration::from_millis(100);

/// Most jobs in one transaction.
const MAX_BATCH: usize = 512;

fn private_files(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    for suffix in ["", "-wal", "-shm"] {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        let file = PathBuf::from(name);
        let Ok(meta) = std::fs::metadata(&file) else {
            continue;
        };
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                file = %file.display(),
                mode = %format!("{mode:o}"),
                "store file was readable by others; setting it to 0600"
            );
            if let Err(e) = std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))
            {
                tracing::warn!(file = %file.display(), error = %e, "cannot set the store file to 0600");
            }
        }
    }
    Ok(())
}

impl Sqlite {
    /// Opens (creating if needed) the database at `path`, in WAL mode with
    /// full fsync, applies the migrations and starts the writer thread. The
    /// database and its `-wal` and `-shm` files are owner-only (0600).
    /// Blocking.
    pub fn open(path: &Path) -> Result<Sqlite> {
        Sqlite::open_with(path, Sync::Full)
    }

    /// [`Sqlite::open`] with a chosen [`Sync`] mode.
    pub fn open_with(path: &Path, sync: Sync) -> Result<Sqlite> {
        Sqlite::open_checked(path, sync, true)
    }

    /// Opens the database; applies the pending migrations when `migrate`,
    /// else refuses a database whose schema is behind this build's.
    pub fn open_checked(path: &Path, sync: Sync, migrate: bool) -> Result<Sqlite> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            use std::os::unix::fs::DirBuilderExt as _;
            let _ = std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir);
        }
        private_files(path).map_err(|source| Error::Mode {
            path: path.to_path_buf(),
            source,
        })?;
        let open = |path: &Path| -> Result<Connection> {
            let wrap = |source| Error::Open {
                path: path.to_path_buf(),
                source,
            };
            let conn = Connection::open(path).map_err(wrap)?;
            conn.busy_timeout(Duration::from_secs(10)).map_err(wrap)?;
            let mode: String = conn
                .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
                .map_err(wrap)?;
            if !mode.eq_ignore_ascii_case("wal") {
                tracing::warn!(mode = %mode, "sqlite did not switch to WAL; commits will be slower");
            }
            let pragma = match sync {
                Sync::Full => "PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;",
                Sync::Normal => "PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=ON;",
            };
            conn.execute_batch(pragma).map_err(wrap)?;
            Ok(conn)
        };
        let writer_conn = open(path)?;
        if migrate {
            crate::store::migrate::sqlite_apply(&writer_conn).map_err(|e| match e {
                Error::Sqlite(source) => Error::Open {
                    path: path.to_path_buf(),
                    source,
                },
                e => e,
            })?;
        } else {
            crate::store::migrate::sqlite_check(&writer_conn)?;
        }
        let reader = open(path)?;
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("gpuops-store".into())
            .spawn(move || writer_loop(writer_conn, rx))
            .map_err(|e| Error::Task(format!("cannot start the store writer: {e}")))?;
        Ok(Sqlite {
            writer: tx,
            reader: Arc::new(Mutex::new(reader)),
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs a read-only `f` on the reader connection on this thread (blocking).
    pub fn read_blocking<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let guard = self.reader.lock().map_err(|_| Error::Poisoned)?;
        f(&guard)
    }

    /// Runs a read-only `f` on the blocking pool, within [`CALL_DEADLINE`].
    pub async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let store = self.clone();
        let task = tokio::task::spawn_blocking(move || store.read_blocking(f));
        match tokio::time::timeout(CALL_DEADLINE, task).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(Error::Task(e.to_string())),
            Err(_) => Err(Error::Deadline(CALL_DEADLINE)),
        }
    }

    fn submit<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T> + Send + 'static,
        reply: impl FnOnce(Result<T>) + Send + 'static,
    ) -> Result<()> {
        let job: Job = Box::new(move |conn| match conn {
            Err(why) => {
                let why = why.to_string();
                Box::new(move |_| reply(Err(Error::Task(why))))
            }
            Ok(c) => {
                let r = in_savepoint(c, f);
                Box::new(move |commit_error: Option<&str>| {
                    reply(match (r, commit_error) {
                        (Ok(v), None) => Ok(v),
                        (Ok(_), Some(e)) => Err(Error::Task(format!("commit failed: {e}"))),
                        (Err(e), _) => Err(e),
                    })
                })
            }
        });
        self.writer
            .send(job)
            .map_err(|_| Error::Task("the store writer has stopped".into()))
    }

    /// Runs `f` on the writer thread; returns after its batch is committed
    /// (durable). `f` runs inside a savepoint of a larger transaction: it
    /// must not BEGIN or COMMIT itself; an `Err` undoes only its own changes.
    /// Other modules use this for their own tables (create them with
    /// `CREATE TABLE IF NOT EXISTS` on first use).
    pub async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(f, move |r| {
            let _ = tx.send(r);
        })?;
        match tokio::time::timeout(CALL_DEADLINE, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(Error::Task("the store writer dropped a job".into())),
            Err(_) => Err(Error::Deadline(CALL_DEADLINE)),
        }
    }

    /// [`Sqlite::write`] for blocking callers (CLI, tests).
    pub fn write_blocking<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::channel();
        self.submit(f, move |r| {
            let _ = tx.send(r);
        })?;
        match rx.recv_timeout(CALL_DEADLINE) {
            Ok(r) => r,
            Err(_) => Err(Error::Deadline(CALL_DEADLINE)),
        }
    }

    /// Stores one webhook and its group's new state, and enqueues deliveries,
    /// in one transaction. A state seen before for this group changes nothing
    /// but the raw webhook log.
    pub async fn ingest(&self, raw: String, update: GroupUpdate) -> Result<IngestResult> {
        self.write(move |c| ingest_tx(c, &raw, &update, now()))
            .await
    }

    /// Records an acknowledgement and refreshes the group's messages.
    pub async fn acknowledge(&self, group_id: i64, who: String) -> Result<bool> {
        self.write(move |c| {
            let tx = c;
            let exists: bool = tx
                .query_row("SELECT 1 FROM alert_groups WHERE id=?1", [group_id], |_| {
                    Ok(())
                })
                .optional()?
                .is_some();
            if !exists {
                return Ok(false);
            }
            tx.execute(
                "INSERT INTO acks(group_id, who, at) VALUES (?1, ?2, ?3)
                 ON CONFLICT(group_id) DO UPDATE SET who=excluded.who, at=excluded.at",
                params![group_id, who, now()],
            )?;
            refresh_tx(tx, group_id, now())?;
            Ok(true)
        })
        .await
    }

    /// Re-renders every message of a group (after an ack or any change that
    /// is not a webhook). Returns the outbox rows touched.
    pub async fn refresh(&self, group_id: i64) -> Result<usize> {
        self.write(move |c| {
            let tx = c;
            let n = refresh_tx(tx, group_id, now())?;
            Ok(n)
        })
        .await
    }

    /// Enqueues a thread reply (a JSON-serialised `notify::Message`) under the
    /// group's message at every destination it was (or will be) posted to.
    pub async fn enqueue_reply(&self, group_id: i64, body: String) -> Result<usize> {
        self.write(move |c| {
            let tx = c;
            let dests = group_destinations(tx, group_id)?;
            let t = now();
            for d in &dests {
                tx.execute(
                    "INSERT INTO outbox(group_id, destination, kind, rev, body, created_at, next_attempt_at)
                     VALUES (?1, ?2, 'reply', 0, ?3, ?4, ?4)",
                    params![group_id, d, body, t],
                )?;
            }
            Ok(dests.len())
        })
        .await
    }

    pub async fn group(&self, group_id: i64) -> Result<Option<GroupRecord>> {
        self.read(move |c| group_by(c, "id", &group_id)).await
    }

    pub async fn group_by_key(&self, key: String) -> Result<Option<GroupRecord>> {
        self.read(move |c| group_by(c, "group_key", &key)).await
    }

    /// Groups currently firing, newest first.
    pub async fn firing_groups(&self, limit: usize) -> Result<Vec<GroupRecord>> {
        self.read(move |c| {
            let mut st = c.prepare(
                "SELECT id FROM alert_groups WHERE status='firing' ORDER BY updated_at DESC LIMIT ?1",
            )?;
            let ids: Vec<i64> = st
                .query_map([limit as i64], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            let mut out = Vec::new();
            for id in ids {
                if let Some(g) = group_by(c, "id", &id)? {
                    out.push(g);
                }
            }
            Ok(out)
        })
        .await
    }

    pub async fn message(
        &self,
        group_id: i64,
        destination: String,
    ) -> Result<Option<MessageRecord>> {
        self.read(move |c| message_tx(c, group_id, &destination))
            .await
    }

    /// Every message posted for a group.
    pub async fn messages(&self, group_id: i64) -> Result<Vec<MessageRecord>> {
        self.read(move |c| {
            let mut st = c.prepare(
                "SELECT group_id, destination, channel, message_id, rev FROM messages WHERE group_id=?1 ORDER BY destination",
            )?;
            let rows = st
                .query_map([group_id], message_row)?
                .collect::<rusqlite::Result<_>>()?;
            Ok(rows)
        })
        .await
    }

    /// Deletes raw webhooks older than `age`, and groups resolved for longer
    /// than `age` (with their messages and acks) that have nothing pending.
    /// Returns the rows deleted.
    pub async fn prune(&self, age: Duration) -> Result<usize> {
        let cutoff = now() - age.as_secs_f64();
        self.write(move |c| {
            let mut n = c.execute("DELETE FROM webhooks WHERE received_at < ?1", [cutoff])?;
            let old = "SELECT id FROM alert_groups g WHERE status='resolved' AND updated_at < ?1
                       AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.group_id = g.id)";
            n += c.execute(
                &format!("DELETE FROM messages WHERE group_id IN ({old})"),
                [cutoff],
            )?;
            n += c.execute(
                &format!("DELETE FROM acks WHERE group_id IN ({old})"),
                [cutoff],
            )?;
            n += c.execute(
                &format!("DELETE FROM group_incidents WHERE group_id IN ({old})"),
                [cutoff],
            )?;
            n += c.execute(
                &format!("DELETE FROM alert_groups WHERE id IN ({old})"),
                [cutoff],
            )?;
            n += c.execute("DELETE FROM incident_subjects WHERE last_at < ?1", [cutoff])?;
            Ok(n)
        })
        .await
    }

    /// The PagerDuty incident a correlated group pages into (None: its own).
    pub async fn incident(&self, group_id: i64) -> Result<Option<Incident>> {
        self.read(move |c| {
            let linked: Option<i64> = c
                .query_row(
                    "SELECT incident_group_id FROM group_incidents WHERE group_id=?1",
                    [group_id],
                    |r| r.get(0),
                )
                .optional()?;
            let Some(incident) = linked else {
                return Ok(None);
            };
            let others: i64 = c.query_row(
                "SELECT COUNT(*) FROM alert_groups g WHERE g.status='firing' AND g.id <> ?1
                   AND (g.id = ?2 OR g.id IN
                     (SELECT group_id FROM group_incidents WHERE incident_group_id = ?2))",
                params![group_id, incident],
                |r| r.get(0),
            )?;
            Ok(Some(Incident {
                group_id: incident,
                others_firing: others > 0,
            }))
        })
        .await
    }
}

fn ingest_tx(c: &Connection, raw: &str, u: &GroupUpdate, t: f64) -> Result<IngestResult> {
    let tx = c;
    let existing: Option<(i64, i64, String, String, String)> = tx
        .query_row(
            "SELECT id, rev, status, recent_hashes, state FROM alert_groups WHERE group_key=?1",
            [&u.group_key],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
        )
        .optional()?;
    let (group_id, rev, was_firing, old_state) = match existing {
        Some((id, rev, status, recent, old_state)) => {
            let mut hashes: Vec<String> = serde_json::from_str(&recent).unwrap_or_default();
            if hashes.iter().any(|h| h == &u.state_hash) {
                tx.execute(
                    "INSERT INTO webhooks(received_at, group_id, duplicate, payload) VALUES (?1, ?2, 1, ?3)",
                    params![t, id, raw],
                )?;
                let webhook_id = tx.last_insert_rowid();
                return Ok(IngestResult {
                    webhook_id,
                    group_id: id,
                    rev,
                    duplicate: true,
                    enqueued: 0,
                });
            }
            hashes.push(u.state_hash.clone());
            if hashes.len() > RECENT_HASHES {
                let cut = hashes.len() - RECENT_HASHES;
                hashes.drain(..cut);
            }
            let rev = rev + 1;
            tx.execute(
                "UPDATE alert_groups SET receiver=?2, status=?3, tier=?4, rev=?5, state_hash=?6,
                   recent_hashes=?7, state=?8, updated_at=?9 WHERE id=?1",
                params![
                    id,
                    u.receiver,
                    u.status,
                    u.tier,
                    rev,
                    u.state_hash,
                    serde_json::to_string(&hashes).unwrap_or_default(),
                    u.state,
                    t
                ],
            )?;
            (id, rev, status == "firing", Some(old_state))
        }
        None => {
            tx.execute(
                "INSERT INTO alert_groups(group_key, receiver, status, tier, rev, state_hash, recent_hashes,
                   state, first_seen, updated_at) VALUES (?1, ?2, ?3, ?4, 1, ?5, ?6, ?7, ?8, ?8)",
                params![
                    u.group_key,
                    u.receiver,
                    u.status,
                    u.tier,
                    u.state_hash,
                    serde_json::to_string(&[&u.state_hash]).unwrap_or_default(),
                    u.state,
                    t
                ],
            )?;
            (tx.last_insert_rowid(), 1, false, None)
        }
    };
    let mut dests = group_destinations(tx, group_id)?;
    for d in &u.destinations {
        if !dests.contains(d) {
            dests.push(d.clone());
        }
    }
    let mut enqueued = 0;
    for d in &dests {
        enqueued += upsert_alert_row(tx, group_id, d, rev, t)?;
    }
    if was_firing && u.status == "resolved" {
        let body = serde_json::to_string(&crate::message::Message::Text(
            crate::message::TextMessage {
                text: u.resolved_reply.clone(),
                code: None,
                buttons: Vec::new(),
            },
        ))
        .unwrap_or_default();
        for d in &dests {
            tx.execute(
                "INSERT INTO outbox(group_id, destination, kind, rev, body, created_at, next_attempt_at)
                 VALUES (?1, ?2, 'reply', ?3, ?4, ?5, ?5)",
                params![group_id, d, rev, body, t],
            )?;
            enqueued += 1;
        }
    }
    let change = match (&u.change, &old_state) {
        (Some(f), Some(old)) => (f.0)(old),
        _ => None,
    };
    if let Some(reply) = change {
        let kind = if reply.renotify {
            KIND_NOTICE
        } else {
            KIND_REPLY
        };
        for d in &dests {
            tx.execute(
                "INSERT INTO outbox(group_id, destination, kind, rev, body, created_at, next_attempt_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
                params![group_id, d, kind, rev, reply.body, t],
            )?;
            enqueued += 1;
        }
    }
    if let Some(c) = &u.correlate {
        correlate_tx(tx, group_id, c, t)?;
    }
    tx.execute(
        "INSERT INTO webhooks(received_at, group_id, duplicate, payload) VALUES (?1, ?2, 0, ?3)",
        params![t, group_id, raw],
    )?;
    let webhook_id = tx.last_insert_rowid();
    Ok(IngestResult {
        webhook_id,
        group_id,
        rev,
        duplicate: false,
        enqueued,
    })
}

/// Links a P1/P2 group to the incident of its first subject (see
/// [`Correlation`]) at its first ingest, and marks its subjects seen.
fn correlate_tx(tx: &Connection, group_id: i64, c: &Correlation, t: f64) -> Result<()> {
    let linked: Option<i64> = tx
        .query_row(
            "SELECT incident_group_id FROM group_incidents WHERE group_id=?1",
            [group_id],
            |r| r.get(0),
        )
        .optional()?;
    let mut incident = linked;
    for s in &c.subjects {
        // A subject seen within the window keeps its incident; else it
        // points at this group's (or, once linked, its incident's).
        let got: i64 = tx.query_row(
            "INSERT INTO incident_subjects(subject, incident_group_id, last_at) VALUES (?1, ?2, ?3)
             ON CONFLICT(subject) DO UPDATE SET
               incident_group_id = CASE WHEN incident_subjects.last_at >= ?4
                 THEN incident_subjects.incident_group_id ELSE excluded.incident_group_id END,
               last_at = excluded.last_at
             RETURNING incident_group_id",
            params![s, linked.unwrap_or(group_id), t, t - c.window_secs],
            |r| r.get(0),
        )?;
        incident.get_or_insert(got);
    }
    if linked.is_none() {
        if let Some(i) = incident {
            tx.execute(
                "INSERT INTO group_incidents(group_id, incident_group_id, linked_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT(group_id) DO NOTHING",
                params![group_id, i, t],
            )?;
        }
    }
    Ok(())
}

/// Points the pending alert row of (group, destination) at `rev`, or adds one.
pub(crate) fn upsert_alert_row(
    tx: &Connection,
    group_id: i64,
    dest: &str,
    rev: i64,
    t: f64,
) -> Result<usize> {
    let n = tx.execute(
        "UPDATE outbox SET rev=?3 WHERE group_id=?1 AND destination=?2 AND kind='alert'",
        params![group_id, dest, rev],
    )?;
    if n == 0 {
        tx.execute(
            "INSERT INTO outbox(group_id, destination, kind, rev, created_at, next_attempt_at)
             VALUES (?1, ?2, 'alert', ?3, ?4, ?4)",
            params![group_id, dest, rev, t],
        )?;
    }
    Ok(1)
}

pub(crate) fn refresh_tx(tx: &Connection, group_id: i64, t: f64) -> Result<usize> {
    let rev: Option<i64> = tx
        .query_row(
            "SELECT rev FROM alert_groups WHERE id=?1",
            [group_id],
            |r| r.get(0),
        )
        .optional()?;
    let Some(rev) = rev else { return Ok(0) };
    let rev = rev + 1;
    tx.execute(
        "UPDATE alert_groups SET rev=?2, updated_at=?3 WHERE id=?1",
        params![group_id, rev, t],
    )?;
    let dests = group_destinations(tx, group_id)?;
    for d in &dests {
        upsert_alert_row(tx, group_id, d, rev, t)?;
    }
    Ok(dests.len())
}

/// Destinations a group was posted to or has pending alert rows for.
pub(crate) fn group_destinations(c: &Connection, group_id: i64) -> Result<Vec<String>> {
    let mut st = c.prepare_cached(
        "SELECT destination FROM messages WHERE group_id=?1
         UNION SELECT destination FROM outbox WHERE group_id=?1 AND kind='alert'
         ORDER BY 1",
    )?;
    let rows = st
        .query_map([group_id], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    Ok(rows)
}

pub(crate) fn group_by(
    c: &Connection,
    column: &str,
    value: &dyn rusqlite::ToSql,
) -> Result<Option<GroupRecord>> {
    let sql = format!(
        "SELECT g.id, g.group_key, g.status, g.tier, g.rev, g.state, g.updated_at, a.who, a.at
         FROM alert_groups g LEFT JOIN acks a ON a.group_id = g.id WHERE g.{column} = ?1"
    );
    Ok(c.query_row(&sql, [value], |r| {
        let who: Option<String> = r.get(7)?;
        let at: Option<f64> = r.get(8)?;
        Ok(GroupRecord {
            id: r.get(0)?,
            group_key: r.get(1)?,
            status: r.get(2)?,
            tier: r.get(3)?,
            rev: r.get(4)?,
            state: r.get(5)?,
            updated_at: r.get(6)?,
            ack: who.map(|by| Ack {
                by,
                at: at.unwrap_or(0.0),
            }),
        })
    })
    .optional()?)
}

fn message_tx(c: &Connection, group_id: i64, dest: &str) -> Result<Option<MessageRecord>> {
    Ok(c.query_row(
        "SELECT group_id, destination, channel, message_id, rev FROM messages WHERE group_id=?1 AND destination=?2",
        params![group_id, dest],
        message_row,
    )
    .optional()?)
}

fn message_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<MessageRecord> {
    Ok(MessageRecord {
        group_id: r.get(0)?,
        destination: r.get(1)?,
        channel: r.get(2)?,
        message_id: r.get(3)?,
        rev: r.get(4)?,
    })
}

/// Runs `f` inside a savepoint: its changes are kept only if it succeeds.
fn in_savepoint<T>(c: &Connection, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
    c.execute_batch("SAVEPOINT job")?;
    match f(c) {
        Ok(v) => {
            c.execute_batch("RELEASE job")?;
            Ok(v)
        }
        Err(e) => {
            let _ = c.execute_batch("ROLLBACK TO job; RELEASE job");
            Err(e)
        }
    }
}

/// The writer thread: takes every queued job, runs them in one
/// transaction, commits once (one fsync), then answers them all.
fn writer_loop(conn: Connection, rx: std::sync::mpsc::Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
            let why = format!("cannot begin a transaction: {e}");
            for job in batch {
                job(Err(&why))(Some(&why));
            }
            continue;
        }
        let jobs = batch.len();
        let started = std::time::Instant::now();
        let done: Vec<Done> = batch.into_iter().map(|job| job(Ok(&conn))).collect();
        let ran = started.elapsed();
        let commit_error = match conn.execute_batch("COMMIT") {
            Ok(()) => None,
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                tracing::error!(error = %e, "store commit failed");
                Some(e.to_string())
            }
        };
        let total = started.elapsed();
        if total > SLOW_COMMIT {
            tracing::warn!(
                jobs,
                run_ms = ran.as_secs_f64() * 1000.0,
                commit_ms = (total - ran).as_secs_f64() * 1000.0,
                "slow store commit (disk sync or contention)"
            );
        }
        for d in done {
            d(commit_error.as_deref());
        }
    }
}
