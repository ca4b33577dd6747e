//! The bot's durable state: raw webhooks, alert groups (with the state
//! hashes that collapse AlertManager HA duplicates), posted messages
//! (platform ids for edits and thread replies), the delivery outbox, dead
//! letters, acknowledgements, the chat replay keys, runbook runs, paging
//! state and the audit log.
//!
//! [`Store`] is the seam: one handle, two backends behind it. SQLite
//! (`sqlite.rs`, the default: `[store] path`) is one process's embedded
//! database; PostgreSQL (`pg.rs`, `[store] url`) is shared by several bot
//! replicas. Every method exists in both with the same signature (the
//! `seam!` list in `seam.rs` dispatches them), so a new query is one method
//! in each backend and one line in that list.
//!
//! Durability (SQLite): WAL journal with `synchronous=FULL` by default, so a
//! commit returns only after the WAL is fsynced; `POST /alertmanager`
//! answers 200 after that commit, hence an acknowledged webhook survives
//! `kill -9` and power loss. [`Sync::Normal`] (`[store] sync = "normal"`)
//! skips that fsync: still safe against a process crash or `kill -9` (the
//! WAL is in the OS page cache), but the last commits can be lost if the
//! machine itself dies. Writes are group-committed by one writer thread.
//! PostgreSQL: each call is one transaction, answered after its COMMIT.
//!
//! Every call from async code has a deadline ([`CALL_DEADLINE`]). This
//! module knows nothing about chat platforms or AlertManager's JSON.
//!
//! SQLite files hold alert contents, chat user ids and the audit log: they
//! are created (or tightened to) 0600 whatever the process umask.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::message::Ack;

mod audit;
pub mod copy;
pub mod lifecycle;
pub mod migrate;
pub mod outbox;
pub mod paging;
pub mod pg;
pub mod reports;
pub mod runs;
mod seam;
pub mod sqlite;

pub use crate::secret::redact_url;

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
    #[error("postgresql: {0}")]
    Postgres(String),
    /// The database cannot be reached (connect, pool, TLS): retry later.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    #[error("store schema: {0}")]
    Schema(String),
}

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Error {
        if e.is_closed() {
            return Error::Unavailable(format!("connection closed: {e}"));
        }
        // The server's message (no connection parameters, so no password).
        match e.as_db_error() {
            Some(db) => Error::Postgres(format!("{} ({})", db.message(), db.code().code())),
            None => Error::Unavailable(e.to_string()),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// A handle to the database, SQLite or PostgreSQL; cheap to clone.
#[derive(Clone)]
pub struct Store {
    backend: Backend,
}

/// The two implementations of the seam. An enum rather than a trait
/// object: both are known at compile time, calls need no boxed futures,
/// and `seam!` checks that each backend has every method.
#[derive(Clone)]
enum Backend {
    Sqlite(sqlite::Sqlite),
    Postgres(pg::Pg),
}

impl Store {
    /// Opens (creating if needed) the SQLite database at `path`, in WAL mode
    /// with full fsync, applies the migrations and starts the writer thread.
    /// The database and its `-wal` and `-shm` files are owner-only (0600).
    /// Blocking.
    pub fn open(path: &std::path::Path) -> Result<Store> {
        Store::open_with(path, Sync::Full)
    }

    /// [`Store::open`] with a chosen [`Sync`] mode.
    pub fn open_with(path: &std::path::Path, sync: Sync) -> Result<Store> {
        Ok(Store {
            backend: Backend::Sqlite(sqlite::Sqlite::open_with(path, sync)?),
        })
    }

    /// Opens the store `cfg` names: PostgreSQL when `url` is set (migrated
    /// first unless `migrate_on_start` is off), else SQLite at `path`.
    pub async fn open_config(cfg: &crate::config::bot::StoreConfig) -> Result<Store> {
        match &cfg.url {
            Some(_) => {
                let pg = pg::Pg::connect(pg::Settings::from_config(cfg)?).await?;
                if cfg.migrate_on_start {
                    pg.migrate().await?;
                } else {
                    pg.check_schema().await?;
                }
                Ok(Store {
                    backend: Backend::Postgres(pg),
                })
            }
            None => {
                let (path, sync, migrate) = (cfg.path.clone(), cfg.sync, cfg.migrate_on_start);
                let s = tokio::task::spawn_blocking(move || {
                    sqlite::Sqlite::open_checked(&path, sync, migrate)
                })
                .await
                .map_err(|e| Error::Task(e.to_string()))??;
                Ok(Store {
                    backend: Backend::Sqlite(s),
                })
            }
        }
    }

    /// A PostgreSQL store (already connected and migrated).
    pub fn postgres(pg: pg::Pg) -> Store {
        Store {
            backend: Backend::Postgres(pg),
        }
    }

    /// The SQLite backend, for tests and tools that need raw SQL on it.
    pub fn sqlite(&self) -> Option<&sqlite::Sqlite> {
        match &self.backend {
            Backend::Sqlite(s) => Some(s),
            Backend::Postgres(_) => None,
        }
    }

    /// The PostgreSQL backend, when that is what this store is.
    pub fn pg(&self) -> Option<&pg::Pg> {
        match &self.backend {
            Backend::Sqlite(_) => None,
            Backend::Postgres(p) => Some(p),
        }
    }

    /// Where the data is, for logs and errors: the SQLite file, or the
    /// PostgreSQL URL without its password.
    pub fn describe(&self) -> String {
        match &self.backend {
            Backend::Sqlite(s) => s.path().display().to_string(),
            Backend::Postgres(p) => p.describe(),
        }
    }

    /// Appends an audit record: who did what, with which parameters, to
    /// what, and how it ended. Also logged.
    pub async fn audit(
        &self,
        who: String,
        action: String,
        params_json: serde_json::Value,
        target: Option<String>,
        outcome: String,
    ) -> Result<i64> {
        tracing::info!(
            who = %who,
            action = %action,
            params = %params_json,
            target = target.as_deref().unwrap_or(""),
            outcome = %outcome,
            "audit"
        );
        self.audit_insert(who, action, params_json, target, outcome)
            .await
    }
}

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
    /// What changed since the group's previous state (alerts joined, some
    /// resolved while others fire): asked in the ingest transaction, with
    /// the state stored before this one, so two replicas never both
    /// announce one change. `None`: say nothing.
    pub change: Option<ChangeReply>,
    /// P1/P2 groups: share a PagerDuty incident with groups about the same
    /// subjects (see [`Correlation`]).
    pub correlate: Option<Correlation>,
}

/// Compares a group's previous state (the stored `state` text) with the
/// new one: the thread reply to post about the change, if any. The store
/// does not read AlertManager's JSON; the ingest path that does gives it
/// this function.
#[derive(Clone)]
pub struct ChangeReply(pub Arc<ChangeFn>);

/// The function inside a [`ChangeReply`]: previous state → reply.
pub type ChangeFn = dyn Fn(&str) -> Option<Reply> + Send + std::marker::Sync;

impl std::fmt::Debug for ChangeReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChangeReply(..)")
    }
}

/// A thread reply decided at ingest.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// A JSON-serialised `message::Message`.
    pub body: String,
    /// Notify again ([`KIND_NOTICE`]): Slack `reply_broadcast`, PagerDuty
    /// a `trigger` with the incident's dedup key; else a plain reply.
    pub renotify: bool,
}

/// One fault, one page: the subjects of a P1/P2 group's firing alerts
/// (`<instance>|<gpu>`) and how long a subject keeps pointing at the
/// incident that first paged about it. A group whose first subject was
/// seen within `window_secs` pages into that incident (its PagerDuty
/// `dedup_key`); otherwise it opens its own. Decided once per group, in
/// the ingest transaction (PostgreSQL: one upsert on the subject's row,
/// so concurrent replicas agree).
#[derive(Debug, Clone, PartialEq)]
pub struct Correlation {
    pub subjects: Vec<String>,
    pub window_secs: f64,
}

pub use crate::message::Incident;

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
/// A thread reply that notifies again (an alert joined an open group of a
/// tier with `[routing] renotify_tiers`).
pub const KIND_NOTICE: &str = "notice";

/// One pending delivery.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxRow {
    pub id: i64,
    pub group_id: i64,
    pub destination: String,
    /// [`KIND_ALERT`]: post or edit the group's message with its latest
    /// state; [`KIND_REPLY`]: a thread reply whose body is a JSON message;
    /// [`KIND_NOTICE`]: the same, notifying again.
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

pub use crate::config::bot::StoreSync as Sync;

/// Makes the database owner-only before SQLite opens it, whatever the
/// process umask: creates the file 0600 if it is missing (SQLite then gives
/// its `-wal` and `-shm` files the database file's mode), and tightens an
/// existing database, `-wal` or `-shm` readable by others to 0600, with a
/// warning (a reader that does not own them, e.g. `gpuops audit` as another
/// user, only gets the warning).
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
            change: None,
            correlate: None,
        }
    }

    /// Each case runs on SQLite (plain `cargo test`) and on PostgreSQL
    /// (ignored there; `.ci/run` starts a server and includes them).
    macro_rules! on_both {
        ($($case:ident => $pg:ident;)*) => {$(
            mod $case {
                #[tokio::test]
                async fn sqlite() {
                    let (_d, s) = super::open();
                    super::$case(s).await
                }

                #[tokio::test]
                #[ignore = "needs PostgreSQL: run by .ci/run"]
                async fn $pg() {
                    super::$case(crate::store::pg::test_store().await.unwrap()).await
                }
            }
        )*};
    }

    on_both! {
        duplicates_change_nothing_and_updates_coalesce => postgres;
        delivery_keeps_a_row_that_got_newer_state_meanwhile => postgres;
        resolve_enqueues_an_edit_then_a_reply_in_order => postgres;
        retries_wait_and_dead_letters_keep_the_error => postgres;
        audit_round_trips_and_filters_by_time => postgres;
        ack_is_stored_and_refreshes_messages => postgres;
        prune_forgets_long_resolved_groups_only => postgres;
        groups_about_one_gpu_share_an_incident_within_the_window => postgres;
        a_change_reply_is_enqueued_once_behind_the_edit => postgres;
    }

    fn about(key: &str, hash: &str, subject: &str, window_secs: f64) -> GroupUpdate {
        let mut u = update(key, "firing", hash, &["pagerduty:abc"]);
        u.correlate = Some(Correlation {
            subjects: vec![subject.to_string()],
            window_secs,
        });
        u
    }

    async fn groups_about_one_gpu_share_an_incident_within_the_window(s: Store) {
        let bus = s
            .ingest("{}".into(), about("bus", "h1", "n1|5", 600.0))
            .await
            .unwrap();
        let down = s
            .ingest("{}".into(), about("down", "h1", "n1|5", 600.0))
            .await
            .unwrap();
        let other_gpu = s
            .ingest("{}".into(), about("gpu0", "h1", "n1|0", 600.0))
            .await
            .unwrap();
        let i = |g| {
            let s = s.clone();
            async move { s.incident(g).await.unwrap().unwrap() }
        };
        assert_eq!(i(down.group_id).await.group_id, bus.group_id);
        assert_eq!(i(bus.group_id).await.group_id, bus.group_id);
        assert!(i(bus.group_id).await.others_firing);
        assert_eq!(i(other_gpu.group_id).await.group_id, other_gpu.group_id);
        assert!(!i(other_gpu.group_id).await.others_firing);
        // A later state of the second group keeps its incident.
        s.ingest("{}".into(), about("down", "h2", "n1|5", 600.0))
            .await
            .unwrap();
        assert_eq!(i(down.group_id).await.group_id, bus.group_id);
        // The first resolves: the second is the incident's last.
        let mut r = update("bus", "resolved", "h3", &["pagerduty:abc"]);
        r.correlate = None;
        s.ingest("{}".into(), r).await.unwrap();
        assert!(!i(down.group_id).await.others_firing);
        // Outside the window (the subject last seen long ago): its own.
        let late = s
            .ingest("{}".into(), about("late", "h1", "n1|5", -1.0))
            .await
            .unwrap();
        assert_eq!(i(late.group_id).await.group_id, late.group_id);
        // Without correlation a group has no incident row at all.
        let plain = s
            .ingest("{}".into(), update("plain", "firing", "h1", &["slack:C1"]))
            .await
            .unwrap();
        assert_eq!(s.incident(plain.group_id).await.unwrap(), None);
    }

    async fn a_change_reply_is_enqueued_once_behind_the_edit(s: Store) {
        let said = |old: &str| {
            Some(Reply {
                body: format!("{{\"was\":{old:?}}}"),
                renotify: true,
            })
        };
        let mut first = update("g", "firing", "h1", &["slack:C1"]);
        first.state = "one".into();
        first.change = Some(ChangeReply(Arc::new(said)));
        s.ingest("{}".into(), first).await.unwrap();
        let row = s.due(now() + 1.0, 10).await.unwrap().remove(0);
        s.alert_delivered(row, 1, "C1".into(), "1.1".into())
            .await
            .unwrap();
        let mut second = update("g", "firing", "h2", &["slack:C1"]);
        second.state = "two".into();
        second.change = Some(ChangeReply(Arc::new(said)));
        s.ingest("{}".into(), second.clone()).await.unwrap();
        // The same state again (another replica): nothing more.
        s.ingest("{}".into(), second).await.unwrap();
        let due = s.due(now() + 1.0, 10).await.unwrap();
        assert_eq!(due.len(), 1, "the reply waits behind the edit");
        assert_eq!(due[0].kind, KIND_ALERT);
        s.alert_delivered(due[0].clone(), 2, "C1".into(), "1.1".into())
            .await
            .unwrap();
        let due = s.due(now() + 1.0, 10).await.unwrap();
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].kind, KIND_NOTICE);
        assert_eq!(due[0].body.as_deref(), Some(r#"{"was":"one"}"#));
        s.delivered(due[0].id).await.unwrap();
        assert_eq!(s.pending().await.unwrap(), 0);
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

    async fn duplicates_change_nothing_and_updates_coalesce(s: Store) {
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

    async fn delivery_keeps_a_row_that_got_newer_state_meanwhile(s: Store) {
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

    async fn resolve_enqueues_an_edit_then_a_reply_in_order(s: Store) {
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

    async fn retries_wait_and_dead_letters_keep_the_error(s: Store) {
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

    async fn audit_round_trips_and_filters_by_time(s: Store) {
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

    async fn ack_is_stored_and_refreshes_messages(s: Store) {
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

    async fn prune_forgets_long_resolved_groups_only(s: Store) {
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
