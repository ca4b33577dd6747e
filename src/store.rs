//! The bot's durable state in SQLite: raw webhooks, alert groups (with the
//! state hashes that collapse AlertManager HA duplicates), posted messages
//! (platform ids for edits and thread replies), the delivery outbox, dead
//! letters, acknowledgements, the chat replay keys and the audit log.
//!
//! Durability: WAL journal with `synchronous=FULL` by default, so a commit
//! returns only after the WAL is fsynced; `POST /alertmanager` answers 200
//! after that commit, hence an acknowledged webhook survives `kill -9` and
//! power loss. [`Sync::Normal`] (`[store] sync = "normal"`) skips that fsync:
//! still safe against a process crash or `kill -9` (the WAL is in the OS page
//! cache), but the last commits can be lost if the machine itself dies; it
//! trades that for commit latency on disks with slow syncs.
//!
//! Writes are group-committed by one writer thread: webhooks arriving while
//! a commit is syncing share the next commit (one fsync for many). Reads use
//! a second connection on the blocking pool. Async callers go through
//! [`Store::read`] and [`Store::write`], both with a deadline. This module
//! knows nothing about chat platforms or AlertManager's JSON.
//!
//! The files hold alert contents, chat user ids and the audit log: they are
//! created (or tightened to) 0600 whatever the process umask.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use crate::message::Ack;

mod audit;
pub mod outbox;
pub mod paging;
pub mod reports;
pub mod runs;

/// Deadline of one store call from async code.
pub const CALL_DEADLINE: Duration = Duration::from_secs(30);
/// How many recent state hashes a group remembers (HA duplicates, reordering).
const RECENT_HASHES: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("cannot open store {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("cannot make store file {path} owner-only: {source}")]
    Mode {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("store call exceeded its {0:?} deadline")]
    Deadline(Duration),
    #[error("store task failed: {0}")]
    Task(String),
    #[error("store lock poisoned")]
    Poisoned,
}

pub type Result<T> = std::result::Result<T, Error>;

/// A handle to the database; cheap to clone.
///
/// Writes go to one writer thread that commits whatever queued up while the
/// previous commit was syncing in a single transaction (group commit: one
/// fsync for many webhooks), each job inside its own savepoint so one
/// failing job does not undo the others. Reads use a separate connection
/// (WAL readers do not block the writer).
#[derive(Clone)]
pub struct Store {
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

/// What ingesting one webhook should record.
#[derive(Debug, Clone)]
pub struct GroupUpdate {
    pub group_key: String,
    pub receiver: String,
    /// `firing` or `resolved`.
    pub status: String,
    pub tier: String,
    pub state_hash: String,
    /// The group's current state (the webhook, re-serialised).
    pub state: String,
    /// Destination keys for the current tier (see `routing::Target::key`).
    pub destinations: Vec<String>,
    /// Thread reply to post when the group goes from firing to resolved.
    pub resolved_reply: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngestResult {
    pub webhook_id: i64,
    pub group_id: i64,
    pub rev: i64,
    /// The same group state was seen before: nothing was enqueued.
    pub duplicate: bool,
    /// Outbox rows added or refreshed.
    pub enqueued: usize,
}

/// A stored alert group.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupRecord {
    pub id: i64,
    pub group_key: String,
    pub status: String,
    pub tier: String,
    pub rev: i64,
    pub state: String,
    pub ack: Option<Ack>,
    pub updated_at: f64,
}

/// A message posted for a group at a destination.
#[derive(Debug, Clone, PartialEq)]
pub struct MessageRecord {
    pub group_id: i64,
    pub destination: String,
    pub channel: String,
    pub message_id: String,
    pub rev: i64,
}

/// Kinds of outbox rows.
pub const KIND_ALERT: &str = "alert";
pub const KIND_REPLY: &str = "reply";

/// One pending delivery.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxRow {
    pub id: i64,
    pub group_id: i64,
    pub destination: String,
    /// [`KIND_ALERT`]: post or edit the group's message with its latest
    /// state; [`KIND_REPLY`]: a thread reply whose body is a JSON message.
    pub kind: String,
    pub rev: i64,
    pub body: Option<String>,
    pub attempts: i64,
    pub created_at: f64,
    pub next_attempt_at: f64,
}

/// A delivery that will not be retried.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadLetter {
    pub id: i64,
    pub group_id: i64,
    pub destination: String,
    pub kind: String,
    pub attempts: i64,
    pub error: String,
    pub at: f64,
}

/// A group and what happened to it: webhooks received (time, status) and
/// messages posted (time, destination, channel).
#[derive(Debug, Clone, PartialEq)]
pub struct GroupHistory {
    pub group: GroupRecord,
    pub first_seen: f64,
    pub webhooks: Vec<(f64, String)>,
    pub messages: Vec<(f64, String, String)>,
}

/// One audit record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub id: i64,
    /// Unix seconds.
    pub at: f64,
    /// A platform user id (`slack:U0123`, `discord:1234`) or `cli:<user>`.
    pub who: String,
    pub action: String,
    pub params: serde_json::Value,
    pub target: Option<String>,
    pub outcome: String,
}

/// Unix time in seconds (fractional).
pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS webhooks (
    id INTEGER PRIMARY KEY,
    received_at REAL NOT NULL,
    group_id INTEGER,
    duplicate INTEGER NOT NULL DEFAULT 0,
    payload TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS webhooks_received ON webhooks(received_at);
CREATE TABLE IF NOT EXISTS alert_groups (
    id INTEGER PRIMARY KEY,
    group_key TEXT NOT NULL UNIQUE,
    receiver TEXT NOT NULL,
    status TEXT NOT NULL,
    tier TEXT NOT NULL,
    rev INTEGER NOT NULL,
    state_hash TEXT NOT NULL,
    recent_hashes TEXT NOT NULL,
    state TEXT NOT NULL,
    first_seen REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    group_id INTEGER NOT NULL,
    destination TEXT NOT NULL,
    channel TEXT NOT NULL,
    message_id TEXT NOT NULL,
    rev INTEGER NOT NULL,
    posted_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (group_id, destination)
);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY,
    group_id INTEGER NOT NULL,
    destination TEXT NOT NULL,
    kind TEXT NOT NULL,
    rev INTEGER NOT NULL,
    body TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    next_attempt_at REAL NOT NULL,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS outbox_key ON outbox(group_id, destination, id);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox(next_attempt_at);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY,
    outbox_id INTEGER NOT NULL,
    group_id INTEGER NOT NULL,
    destination TEXT NOT NULL,
    kind TEXT NOT NULL,
    body TEXT,
    attempts INTEGER NOT NULL,
    error TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS acks (
    group_id INTEGER PRIMARY KEY,
    who TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    who TEXT NOT NULL,
    action TEXT NOT NULL,
    params TEXT NOT NULL,
    target TEXT,
    outcome TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_at ON audit(at);
CREATE TABLE IF NOT EXISTS replay_keys (
    key BLOB PRIMARY KEY,
    seen_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS replay_keys_seen ON replay_keys(seen_at);
"#;

pub use crate::config::bot::StoreSync as Sync;

/// Makes the database owner-only before SQLite opens it, whatever the
/// process umask: creates the file 0600 if it is missing (SQLite then gives
/// its `-wal` and `-shm` files the database file's mode), and tightens an
/// existing database, `-wal` or `-shm` readable by others to 0600, with a
/// warning (a reader that does not own them, e.g. `gpuops audit` as another
/// user, only gets the warning).
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

impl Store {
    /// Opens (creating if needed) the database at `path`, in WAL mode with
    /// full fsync, applies the schema and starts the writer thread. The
    /// database and its `-wal` and `-shm` files are owner-only (0600).
    /// Blocking.
    pub fn open(path: &Path) -> Result<Store> {
        Store::open_with(path, Sync::Full)
    }

    /// [`Store::open`] with a chosen [`Sync`] mode.
    pub fn open_with(path: &Path, sync: Sync) -> Result<Store> {
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
        writer_conn
            .execute_batch(&format!("{SCHEMA}{}{}", paging::SCHEMA, reports::SCHEMA))
            .map_err(|source| Error::Open {
                path: path.to_path_buf(),
                source,
            })?;
        let reader = open(path)?;
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("gpuops-store".into())
            .spawn(move || writer_loop(writer_conn, rx))
            .map_err(|e| Error::Task(format!("cannot start the store writer: {e}")))?;
        Ok(Store {
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

    /// [`Store::write`] for blocking callers (CLI, tests).
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
                &format!("DELETE FROM alert_groups WHERE id IN ({old})"),
                [cutoff],
            )?;
            Ok(n)
        })
        .await
    }
}

fn ingest_tx(c: &Connection, raw: &str, u: &GroupUpdate, t: f64) -> Result<IngestResult> {
    let tx = c;
    let existing: Option<(i64, i64, String, String)> = tx
        .query_row(
            "SELECT id, rev, status, recent_hashes FROM alert_groups WHERE group_key=?1",
            [&u.group_key],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .optional()?;
    let (group_id, rev, was_firing) = match existing {
        Some((id, rev, status, recent)) => {
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
            (id, rev, status == "firing")
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
            (tx.last_insert_rowid(), 1, false)
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

/// Points the pending alert row of (group, destination) at `rev`, or adds one.
fn upsert_alert_row(tx: &Connection, group_id: i64, dest: &str, rev: i64, t: f64) -> Result<usize> {
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

fn refresh_tx(tx: &Connection, group_id: i64, t: f64) -> Result<usize> {
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
fn group_destinations(c: &Connection, group_id: i64) -> Result<Vec<String>> {
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

fn group_by(
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

#[cfg(test)]
mod tests {
    use super::*;

    fn update(key: &str, status: &str, hash: &str, dests: &[&str]) -> GroupUpdate {
        GroupUpdate {
            group_key: key.into(),
            receiver: "r".into(),
            status: status.into(),
            tier: "P1".into(),
            state_hash: hash.into(),
            state: "{}".into(),
            destinations: dests.iter().map(|s| s.to_string()).collect(),
            resolved_reply: "resolved".into(),
        }
    }

    fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("bot.db")).unwrap();
        (dir, s)
    }

    #[tokio::test]
    async fn replay_keys_are_refused_until_they_are_forgotten() {
        let (d, s) = open();
        let (a, b) = ([1u8; 32], [2u8; 32]);
        assert!(s.first_use(a, 100, 600).await.unwrap());
        assert!(!s.first_use(a, 101, 600).await.unwrap());
        assert!(s.first_use(b, 101, 600).await.unwrap());
        drop(s);
        let s = Store::open(&d.path().join("bot.db")).unwrap();
        assert!(
            !s.first_use(a, 500, 600).await.unwrap(),
            "kept across a reopen"
        );
        assert!(
            s.first_use(a, 701, 600).await.unwrap(),
            "forgotten after keep_secs"
        );
    }

    #[tokio::test]
    async fn duplicates_change_nothing_and_updates_coalesce() {
        let (_d, s) = open();
        let a = s
            .ingest(
                "{}".into(),
                update("g", "firing", "h1", &["slack:C1", "discord:2"]),
            )
            .await
            .unwrap();
        assert_eq!((a.duplicate, a.enqueued, a.rev), (false, 2, 1));
        let dup = s
            .ingest("{}".into(), update("g", "firing", "h1", &["slack:C1"]))
            .await
            .unwrap();
        assert!(dup.duplicate);
        assert_eq!(s.pending().await.unwrap(), 2);
        // A new state while the first is still pending updates the same rows.
        let b = s
            .ingest("{}".into(), update("g", "firing", "h2", &["slack:C1"]))
            .await
            .unwrap();
        assert_eq!((b.duplicate, b.rev), (false, 2));
        let due = s.due(now() + 1.0, 10).await.unwrap();
        assert_eq!(due.len(), 2);
        assert!(due.iter().all(|r| r.rev == 2 && r.kind == KIND_ALERT));
        // An older state arriving late (HA reordering) is also a duplicate.
        assert!(
            s.ingest("{}".into(), update("g", "firing", "h1", &[]))
                .await
                .unwrap()
                .duplicate
        );
    }

    #[tokio::test]
    async fn delivery_keeps_a_row_that_got_newer_state_meanwhile() {
        let (_d, s) = open();
        s.ingest("{}".into(), update("g", "firing", "h1", &["slack:C1"]))
            .await
            .unwrap();
        let row = s.due(now() + 1.0, 10).await.unwrap().remove(0);
        // New state lands while the worker is posting rev 1.
        s.ingest("{}".into(), update("g", "firing", "h2", &["slack:C1"]))
            .await
            .unwrap();
        s.alert_delivered(row.clone(), 1, "C1".into(), "111.1".into())
            .await
            .unwrap();
        let again = s.due(now() + 1.0, 10).await.unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].rev, 2);
        s.alert_delivered(again[0].clone(), 2, "C1".into(), "111.1".into())
            .await
            .unwrap();
        assert_eq!(s.pending().await.unwrap(), 0);
        let m = s
            .message(row.group_id, "slack:C1".into())
            .await
            .unwrap()
            .unwrap();
        assert_eq!((m.message_id.as_str(), m.rev), ("111.1", 2));
    }

    #[tokio::test]
    async fn resolve_enqueues_an_edit_then_a_reply_in_order() {
        let (_d, s) = open();
        s.ingest("{}".into(), update("g", "firing", "h1", &["slack:C1"]))
            .await
            .unwrap();
        let row = s.due(now() + 1.0, 10).await.unwrap().remove(0);
        s.alert_delivered(row, 1, "C1".into(), "1.1".into())
            .await
            .unwrap();
        s.ingest("{}".into(), update("g", "resolved", "h2", &["slack:C1"]))
            .await
            .unwrap();
        let due = s.due(now() + 1.0, 10).await.unwrap();
        assert_eq!(due.len(), 1, "the reply waits behind the edit");
        assert_eq!(due[0].kind, KIND_ALERT);
        s.alert_delivered(due[0].clone(), 2, "C1".into(), "1.1".into())
            .await
            .unwrap();
        let due = s.due(now() + 1.0, 10).await.unwrap();
        assert_eq!(due[0].kind, KIND_REPLY);
    }

    #[tokio::test]
    async fn retries_wait_and_dead_letters_keep_the_error() {
        let (_d, s) = open();
        s.ingest("{}".into(), update("g", "firing", "h1", &["slack:C1"]))
            .await
            .unwrap();
        let row = s.due(now() + 1.0, 10).await.unwrap().remove(0);
        s.retry_at(row.id, now() + 60.0, "HTTP 503".into())
            .await
            .unwrap();
        assert!(s.due(now() + 1.0, 10).await.unwrap().is_empty());
        s.dead_letter(row, "channel_not_found".into())
            .await
            .unwrap();
        assert_eq!(s.pending().await.unwrap(), 0);
        let dl = s.dead_letters().await.unwrap();
        assert_eq!(dl[0].error, "channel_not_found");
    }

    #[tokio::test]
    async fn audit_round_trips_and_filters_by_time() {
        let (_d, s) = open();
        s.audit(
            "slack:U1".into(),
            "silence".into(),
            serde_json::json!({"d": "1h"}),
            Some("GpuXid".into()),
            "ok".into(),
        )
        .await
        .unwrap();
        let all = s.audit_since(0.0).await.unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].params["d"], "1h");
        assert!(s.audit_since(now() + 10.0).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn ack_is_stored_and_refreshes_messages() {
        let (_d, s) = open();
        let r = s
            .ingest("{}".into(), update("g", "firing", "h1", &["slack:C1"]))
            .await
            .unwrap();
        let row = s.due(now() + 1.0, 10).await.unwrap().remove(0);
        s.alert_delivered(row, 1, "C1".into(), "1.1".into())
            .await
            .unwrap();
        assert!(s.acknowledge(r.group_id, "slack:U1".into()).await.unwrap());
        assert!(!s.acknowledge(999, "x".into()).await.unwrap());
        let g = s.group(r.group_id).await.unwrap().unwrap();
        assert_eq!(g.ack.unwrap().by, "slack:U1");
        assert_eq!(s.due(now() + 1.0, 10).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn prune_forgets_long_resolved_groups_only() {
        let (_d, s) = open();
        let a = s
            .ingest("{}".into(), update("old", "resolved", "h1", &[]))
            .await
            .unwrap();
        let b = s
            .ingest("{}".into(), update("firing", "firing", "h2", &[]))
            .await
            .unwrap();
        let c = s
            .ingest(
                "{}".into(),
                update("pending", "resolved", "h3", &["slack:C1"]),
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(s.prune(Duration::from_millis(10)).await.unwrap() > 0);
        assert!(s.group(a.group_id).await.unwrap().is_none());
        assert!(s.group(b.group_id).await.unwrap().is_some());
        assert!(
            s.group(c.group_id).await.unwrap().is_some(),
            "has a pending delivery"
        );
    }
}
