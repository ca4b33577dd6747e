//! The store's side of nodes out of service (`src/lifecycle.rs`): one row
//! per node (`node_states`) and the history of its transitions
//! (`node_transitions`). A transition is decided against the state the
//! database holds ([`decide`]), in the transaction that writes it: SQLite's
//! one writer runs it as one job; PostgreSQL locks the node's row (`SELECT
//! … FOR UPDATE`), so two replicas applying the same step outcome change the
//! node once. The SQLite queries and the shared types are here; PostgreSQL's
//! are `pg/lifecycle.rs`. Only SQL and the transition rule: wording and
//! GPU-hours for people are `src/lifecycle.rs`.

use rusqlite::{params, Connection, OptionalExtension};

pub use crate::runbook::NodeState;
use crate::store::sqlite::Sqlite;
use crate::store::{Error, Result};

/// A node's tracked state.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeRecord {
    pub node: String,
    pub state: NodeState,
    /// Since when it is in `state` (Unix seconds).
    pub since: f64,
    /// When its current stretch out of service began (None: in service).
    pub out_since: Option<f64>,
    pub reason: String,
    pub alert: Option<String>,
    pub xid: Option<String>,
    pub step: Option<String>,
    pub run: Option<String>,
    /// The person who acted last.
    pub by: Option<String>,
    pub gpus: i64,
    /// The alert group whose thread is the node's incident timeline.
    pub group_id: Option<i64>,
    pub updated_at: f64,
    /// It left service again with the same fault (alert or XID) within
    /// the repeat window of its last return.
    pub repeat: bool,
    /// The last reminder that it is still out.
    pub reminded_at: Option<f64>,
}

/// A change asked of a node's state.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Transition {
    pub node: String,
    pub to: Option<NodeState>,
    /// Apply only from one of these states (empty: from any other state).
    pub from: Vec<NodeState>,
    pub at: f64,
    pub reason: String,
    pub alert: Option<String>,
    pub xid: Option<String>,
    pub step: Option<String>,
    pub run: Option<String>,
    pub by: Option<String>,
    /// The node's GPUs (0: keep what the row says).
    pub gpus: i64,
    pub group_id: Option<i64>,
    /// Leaving service within this many seconds of the last return, with
    /// the same alert or XID, is a repeat (0: never).
    pub repeat_window_secs: f64,
    /// Apply only if the node's row is the one the caller read: its
    /// `updated_at` equals this (0.0: a node with no row). None: no such
    /// condition. A change decided from an outside view (the scheduler's,
    /// `src/found.rs`) is never applied over a change made meanwhile.
    pub expect_updated_at: Option<f64>,
}

/// What a transition did.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    /// Whether the state changed (false: already there, or not from an
    /// allowed state).
    pub changed: bool,
    /// The state before.
    pub from: NodeState,
    /// The row after (None: a node never tracked, left alone).
    pub row: Option<NodeRecord>,
    /// A return to service: the stretch's GPU-seconds out of service.
    pub lost_gpu_seconds: Option<f64>,
}

/// One row of `node_transitions`.
#[derive(Debug, Clone, PartialEq)]
pub struct TransitionRecord {
    pub node: String,
    pub from: NodeState,
    pub to: NodeState,
    pub at: f64,
    pub reason: String,
    pub by: Option<String>,
    pub gpus: i64,
    pub out_since: Option<f64>,
    pub lost_gpu_seconds: Option<f64>,
}

/// The fault of a node's last return within the repeat window: its
/// `(alert, xid)`.
pub type LastReturn = Option<(Option<String>, Option<String>)>;

/// Whether a transition leaves service (then the backends look up the
/// node's last return within the window, for [`decide`]).
pub fn leaves_service(cur: Option<&NodeRecord>, t: &Transition) -> bool {
    let from = cur.map(|r| r.state).unwrap_or(NodeState::InService);
    from == NodeState::InService && t.to.is_some_and(|s| s != NodeState::InService)
}

/// The transition rule, one place for both backends: the new row (None:
/// nothing changes) and, for a return to service, the GPU-seconds lost.
/// `last_return`: the fault of the node's last return within the repeat
/// window, when it leaves service now.
pub fn decide(
    cur: Option<&NodeRecord>,
    t: &Transition,
    last_return: LastReturn,
) -> Option<(NodeRecord, Option<f64>)> {
    let to = t.to?;
    let from = cur.map(|r| r.state).unwrap_or(NodeState::InService);
    if from == to || (!t.from.is_empty() && !t.from.contains(&from)) {
        return None;
    }
    if t.expect_updated_at
        .is_some_and(|e| cur.map(|r| r.updated_at).unwrap_or(0.0) != e)
    {
        return None;
    }
    let same = |a: &Option<String>, b: &Option<String>| a.is_some() && a == b;
    let repeat = match (to, from) {
        (NodeState::InService, _) => false,
        (_, NodeState::InService) => {
            last_return.is_some_and(|(alert, xid)| same(&alert, &t.alert) || same(&xid, &t.xid))
        }
        _ => cur.is_some_and(|r| r.repeat),
    };
    let gpus = if t.gpus > 0 {
        t.gpus
    } else {
        cur.map(|r| r.gpus).unwrap_or(0)
    };
    let out_since = match (to, from) {
        (NodeState::InService, _) => None,
        (_, NodeState::InService) => Some(t.at),
        _ => cur.and_then(|r| r.out_since).or(Some(t.at)),
    };
    let lost = match to {
        NodeState::InService => cur
            .and_then(|r| r.out_since)
            .map(|s| (t.at - s).max(0.0) * gpus as f64),
        _ => None,
    };
    let keep = |new: &Option<String>, old: Option<&Option<String>>| {
        new.clone().or_else(|| old.cloned().flatten())
    };
    let row = NodeRecord {
        node: t.node.clone(),
        state: to,
        since: t.at,
        out_since,
        // Never empty: PostgreSQL's placeholder row (nothing tracked yet)
        // is the one with an empty reason.
        reason: if t.reason.trim().is_empty() {
            format!("set {}", to.words())
        } else {
            t.reason.clone()
        },
        alert: keep(&t.alert, cur.map(|r| &r.alert)),
        xid: keep(&t.xid, cur.map(|r| &r.xid)),
        step: t.step.clone(),
        run: t.run.clone(),
        by: t.by.clone(),
        gpus,
        group_id: t.group_id.or_else(|| cur.and_then(|r| r.group_id)),
        updated_at: t.at,
        repeat,
        reminded_at: None,
    };
    Some((row, lost))
}

pub(crate) fn state_of(s: &str) -> Result<NodeState> {
    NodeState::parse(s).ok_or_else(|| Error::Schema(format!("unknown node state {s:?}")))
}

pub(crate) const NODE_COLUMNS: &str =
    "node, state, since, out_since, reason, alert, xid, step, run, by_person, gpus, group_id, updated_at, is_repeat, reminded_at";

/// The node's last return within the window (SQL for both backends, with
/// `?1`/`?2` or `$1`/`$2` for node and the window's start).
pub(crate) const LAST_RETURN: &str = "SELECT alert, xid FROM node_transitions
     WHERE node=?1 AND to_state='in_service' AND at >= ?2 ORDER BY id DESC LIMIT 1";

/// [`LAST_RETURN`] with its time.
pub(crate) const LAST_RETURN_AT: &str = "SELECT at, alert, xid FROM node_transitions
     WHERE node=?1 AND to_state='in_service' AND at >= ?2 ORDER BY id DESC LIMIT 1";

/// A node's last return to service and the fault of the stretch it ended.
#[derive(Debug, Clone, PartialEq)]
pub struct LastReturnAt {
    pub at: f64,
    pub alert: Option<String>,
    pub xid: Option<String>,
}

/// States a reminder is for: out of service with nothing in the way but people.
pub(crate) const REMINDED_STATES: &str = "('quarantined', 'verifying')";

/// States a notice is for (the scheduler shows the node back while gpuops
/// tracks it out): every state out of service.
pub(crate) const NOTICE_STATES: &str = "('quarantined', 'verifying', 'awaiting_repair')";

/// The runs in progress (running or waiting for an approval).
pub(crate) const ACTIVE_RUNS: &str =
    "SELECT given, labels FROM chat_runs WHERE status IN ('running', 'waiting')";

/// The given parameters and alert labels of a run in progress.
pub type ActiveRun = (
    std::collections::BTreeMap<String, String>,
    std::collections::BTreeMap<String, String>,
);

/// Parses [`ACTIVE_RUNS`]' JSON columns (a bad one reads as empty).
pub(crate) fn active_run(given: &str, labels: &str) -> ActiveRun {
    (
        serde_json::from_str(given).unwrap_or_default(),
        serde_json::from_str(labels).unwrap_or_default(),
    )
}

fn node_row(r: &rusqlite::Row) -> rusqlite::Result<(String, NodeRecord)> {
    let state: String = r.get(1)?;
    Ok((
        state,
        NodeRecord {
            node: r.get(0)?,
            state: NodeState::InService,
            since: r.get(2)?,
            out_since: r.get(3)?,
            reason: r.get(4)?,
            alert: r.get(5)?,
            xid: r.get(6)?,
            step: r.get(7)?,
            run: r.get(8)?,
            by: r.get(9)?,
            gpus: r.get(10)?,
            group_id: r.get(11)?,
            updated_at: r.get(12)?,
            repeat: r.get::<_, i64>(13)? != 0,
            reminded_at: r.get(14)?,
        },
    ))
}

fn with_state((s, mut row): (String, NodeRecord)) -> Result<NodeRecord> {
    row.state = state_of(&s)?;
    Ok(row)
}

/// Enqueues `body` (a serialized message) to each destination key of
/// `channels` as a post of its own (no thread).
fn enqueue_posts(c: &Connection, body: &str, channels: &[String]) -> Result<()> {
    for d in channels {
        c.execute(
            "INSERT INTO outbox(group_id, destination, kind, rev, body, created_at, next_attempt_at)
             VALUES (0, ?1, 'reply', 0, ?2, ?3, ?3)",
            params![d, body, crate::store::now()],
        )?;
    }
    Ok(())
}

fn node_tx(c: &Connection, t: &Transition) -> Result<Applied> {
    let cur = c
        .query_row(
            &format!("SELECT {NODE_COLUMNS} FROM node_states WHERE node=?1"),
            [&t.node],
            node_row,
        )
        .optional()?
        .map(with_state)
        .transpose()?;
    let from = cur
        .as_ref()
        .map(|r| r.state)
        .unwrap_or(NodeState::InService);
    let last_return = if leaves_service(cur.as_ref(), t) && t.repeat_window_secs > 0.0 {
        c.query_row(
            LAST_RETURN,
            params![t.node, t.at - t.repeat_window_secs],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?
    } else {
        None
    };
    let Some((row, lost)) = decide(cur.as_ref(), t, last_return) else {
        return Ok(Applied {
            changed: false,
            from,
            row: cur,
            lost_gpu_seconds: None,
        });
    };
    c.execute(
        &format!(
            "INSERT INTO node_states({NODE_COLUMNS}) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,NULL)
             ON CONFLICT(node) DO UPDATE SET state=excluded.state, since=excluded.since,
             out_since=excluded.out_since, reason=excluded.reason, alert=excluded.alert,
             xid=excluded.xid, step=excluded.step, run=excluded.run, by_person=excluded.by_person,
             gpus=excluded.gpus, group_id=excluded.group_id, updated_at=excluded.updated_at,
             is_repeat=excluded.is_repeat, reminded_at=NULL"
        ),
        params![
            row.node,
            row.state.as_str(),
            row.since,
            row.out_since,
            row.reason,
            row.alert,
            row.xid,
            row.step,
            row.run,
            row.by,
            row.gpus,
            row.group_id,
            row.updated_at,
            i64::from(row.repeat)
        ],
    )?;
    c.execute(
        "INSERT INTO node_transitions(node, from_state, to_state, at, reason, alert, xid, step,
         run, by_person, gpus, group_id, out_since, lost_gpu_seconds)
         VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14)",
        params![
            row.node,
            from.as_str(),
            row.state.as_str(),
            row.since,
            row.reason,
            row.alert,
            row.xid,
            row.step,
            row.run,
            row.by,
            row.gpus,
            row.group_id,
            cur.as_ref().and_then(|r| r.out_since),
            lost
        ],
    )?;
    Ok(Applied {
        changed: true,
        from,
        row: Some(row),
        lost_gpu_seconds: lost,
    })
}

#[allow(clippy::too_many_arguments)]
fn claim_tx(
    c: &Connection,
    states: &str,
    node: &str,
    since: f64,
    now: f64,
    min_age: f64,
    gap: f64,
    body: &str,
    channels: &[String],
) -> Result<bool> {
    let claimed = c
        .query_row(
            &format!(
                "UPDATE node_states SET reminded_at=?3
                 WHERE node=?1 AND since=?2 AND state IN {states}
                   AND since <= ?4 AND (reminded_at IS NULL OR reminded_at <= ?5)
                 RETURNING group_id"
            ),
            params![node, since, now, now - min_age, now - gap],
            |r| r.get::<_, Option<i64>>(0),
        )
        .optional()?;
    let Some(group) = claimed else {
        return Ok(false);
    };
    if let Some(g) = group {
        for d in crate::store::sqlite::group_destinations(c, g)? {
            c.execute(
                "INSERT INTO outbox(group_id, destination, kind, rev, body, created_at, next_attempt_at)
                 VALUES (?1, ?2, 'reply', 0, ?3, ?4, ?4)",
                params![g, d, body, crate::store::now()],
            )?;
        }
    }
    // The report channels: a post of its own (no thread).
    enqueue_posts(c, body, channels)?;
    Ok(true)
}

fn all_nodes(c: &Connection) -> Result<Vec<NodeRecord>> {
    let mut st = c.prepare(&format!(
        "SELECT {NODE_COLUMNS} FROM node_states ORDER BY node"
    ))?;
    let rows = st
        .query_map([], node_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    rows.into_iter().map(with_state).collect()
}

impl Sqlite {
    /// Applies a transition if the stored state allows it (one writer job).
    pub async fn node_transition(&self, t: Transition) -> Result<Applied> {
        self.write(move |c| node_tx(c, &t)).await
    }

    /// Applies a transition as [`Sqlite::node_transition`] and, when it
    /// changed the node, enqueues `body` to each of `channels` in the same
    /// job: said once, whichever replica decides it.
    pub async fn node_transition_announced(
        &self,
        t: Transition,
        body: String,
        channels: Vec<String>,
    ) -> Result<Applied> {
        self.write(move |c| {
            let a = node_tx(c, &t)?;
            if a.changed {
                enqueue_posts(c, &body, &channels)?;
            }
            Ok(a)
        })
        .await
    }

    /// Every tracked node, by name.
    pub async fn node_states(&self) -> Result<Vec<NodeRecord>> {
        self.read(all_nodes).await
    }

    /// The given parameters and alert labels of every run in progress.
    pub async fn active_runs(&self) -> Result<Vec<ActiveRun>> {
        self.read(|c| {
            let mut st = c.prepare(ACTIVE_RUNS)?;
            let rows = st
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows.iter().map(|(g, l)| active_run(g, l)).collect())
        })
        .await
    }

    /// Claims a notice that `node` (in any state out of service, entered
    /// at `since` at least `min_age` ago) is seen back by its scheduler,
    /// sharing the daily gap with reminders ([`Sqlite::claim_node_reminder`]),
    /// and enqueues `body` in its thread and to `channels`.
    #[allow(clippy::too_many_arguments)]
    pub async fn claim_node_notice(
        &self,
        node: String,
        since: f64,
        now: f64,
        min_age: f64,
        gap: f64,
        body: String,
        channels: Vec<String>,
    ) -> Result<bool> {
        self.write(move |c| {
            claim_tx(
                c,
                NOTICE_STATES,
                &node,
                since,
                now,
                min_age,
                gap,
                &body,
                &channels,
            )
        })
        .await
    }

    /// Claims a reminder that `node` is still out (in the state it entered
    /// at `since`, for at least `min_age` seconds, not reminded within
    /// `gap` seconds) and enqueues `body` in its incident thread and to
    /// each of `channels` (destination keys: the report channels), in one
    /// job. `false`: not due, or claimed already.
    #[allow(clippy::too_many_arguments)]
    pub async fn claim_node_reminder(
        &self,
        node: String,
        since: f64,
        now: f64,
        min_age: f64,
        gap: f64,
        body: String,
        channels: Vec<String>,
    ) -> Result<bool> {
        self.write(move |c| {
            claim_tx(
                c,
                REMINDED_STATES,
                &node,
                since,
                now,
                min_age,
                gap,
                &body,
                &channels,
            )
        })
        .await
    }

    /// The node's last return to service at or after `since`: when, and
    /// the fault (alert, XID) of the stretch it ended.
    pub async fn node_last_return(&self, node: String, since: f64) -> Result<Option<LastReturnAt>> {
        self.read(move |c| {
            Ok(c.query_row(LAST_RETURN_AT, params![node, since], |r| {
                Ok(LastReturnAt {
                    at: r.get(0)?,
                    alert: r.get(1)?,
                    xid: r.get(2)?,
                })
            })
            .optional()?)
        })
        .await
    }

    /// Transitions at or after `since`, oldest first.
    pub async fn node_transitions(&self, since: f64) -> Result<Vec<TransitionRecord>> {
        self.read(move |c| {
            let mut st = c.prepare(
                "SELECT node, from_state, to_state, at, reason, by_person, gpus, out_since,
                 lost_gpu_seconds FROM node_transitions WHERE at >= ?1 ORDER BY id",
            )?;
            let rows = st
                .query_map([since], |r| {
                    Ok((
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        TransitionRecord {
                            node: r.get(0)?,
                            from: NodeState::InService,
                            to: NodeState::InService,
                            at: r.get(3)?,
                            reason: r.get(4)?,
                            by: r.get(5)?,
                            gpus: r.get(6)?,
                            out_since: r.get(7)?,
                            lost_gpu_seconds: r.get(8)?,
                        },
                    ))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            rows.into_iter()
                .map(|(f, t, mut rec)| {
                    rec.from = state_of(&f)?;
                    rec.to = state_of(&t)?;
                    Ok(rec)
                })
                .collect()
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(to: NodeState, at: f64) -> Transition {
        Transition {
            node: "gpu-node-17".into(),
            to: Some(to),
            at,
            reason: "r".into(),
            gpus: 8,
            ..Transition::default()
        }
    }

    #[test]
    fn a_stretch_out_of_service_keeps_its_start_and_is_charged_on_return() {
        let (q, _) = decide(None, &t(NodeState::Quarantined, 100.0), None).unwrap();
        assert_eq!(q.out_since, Some(100.0));
        let (v, _) = decide(Some(&q), &t(NodeState::Verifying, 500.0), None).unwrap();
        assert_eq!((v.since, v.out_since), (500.0, Some(100.0)));
        let (back, lost) = decide(Some(&v), &t(NodeState::InService, 3700.0), None).unwrap();
        assert_eq!((back.out_since, lost), (None, Some(3600.0 * 8.0)));
        assert!(decide(Some(&v), &t(NodeState::Verifying, 4000.0), None).is_none());
        let mut only = t(NodeState::InService, 10.0);
        only.from = vec![NodeState::Verifying];
        assert!(decide(Some(&q), &only, None).is_none());
        assert!(decide(None, &t(NodeState::InService, 1.0), None).is_none());
    }

    /// Each case on SQLite and (ignored without a server) on PostgreSQL.
    macro_rules! on_both {
        ($($case:ident;)*) => {$(
            mod $case {
                #[tokio::test]
                async fn sqlite() {
                    let d = tempfile::tempdir().unwrap();
                    let s = crate::store::Store::open(&d.path().join("bot.db")).unwrap();
                    super::$case(s).await
                }

                #[tokio::test]
                #[ignore = "needs PostgreSQL: run by .ci/run"]
                async fn postgres() {
                    super::$case(crate::store::pg::test_store().await.unwrap()).await
                }
            }
        )*};
    }

    on_both! {
        transitions_are_decided_against_the_stored_state;
        a_change_from_an_outside_view_is_said_once_and_never_over_a_change_made_meanwhile;
        a_reminder_is_claimed_once_a_day_and_reset_by_a_change;
        leaving_again_with_the_same_fault_within_the_window_is_a_repeat;
    }

    const H: f64 = 3600.0;

    /// A found-drained quarantine (`src/found.rs`): applied only over the
    /// row it was decided from, its line enqueued with it, once.
    async fn a_change_from_an_outside_view_is_said_once_and_never_over_a_change_made_meanwhile(
        s: crate::store::Store,
    ) {
        let found = |at: f64, read: f64| {
            let mut q = t(NodeState::Quarantined, at);
            q.from = vec![NodeState::InService];
            q.expect_updated_at = Some(read);
            q
        };
        let say = |q: Transition| {
            let s = s.clone();
            async move {
                s.node_transition_announced(q, "{}".into(), vec!["slack:C0REPORTS".into()])
                    .await
                    .unwrap()
            }
        };
        // Untracked when read (0.0): applied, and said.
        assert!(say(found(100.0, 0.0)).await.changed);
        assert_eq!(s.pending().await.unwrap(), 1);
        // The same change again (another replica): nothing, nothing said.
        assert!(!say(found(101.0, 0.0)).await.changed);
        assert_eq!(s.pending().await.unwrap(), 1);
        // A person returns it after the pass read the row: the pass's
        // change, decided from the old row, is not applied over it.
        s.node_transition(t(NodeState::InService, 200.0))
            .await
            .unwrap();
        let stale = say(found(300.0, 100.0)).await;
        assert!(!stale.changed);
        assert_eq!(stale.row.unwrap().state, NodeState::InService);
        assert_eq!(s.pending().await.unwrap(), 1);
        // Decided from the row as it is now: applied.
        assert!(say(found(400.0, 200.0)).await.changed);
        assert_eq!(s.pending().await.unwrap(), 2);
    }

    async fn a_reminder_is_claimed_once_a_day_and_reset_by_a_change(s: crate::store::Store) {
        s.node_transition(t(NodeState::Quarantined, 0.0))
            .await
            .unwrap();
        let claim = |at: f64| {
            let s = s.clone();
            async move {
                s.claim_node_reminder(
                    "gpu-node-17".into(),
                    0.0,
                    at,
                    12.0 * H,
                    24.0 * H,
                    "{}".into(),
                    Vec::new(),
                )
                .await
                .unwrap()
            }
        };
        assert!(!claim(11.0 * H).await, "not due before remind_after");
        assert!(claim(12.0 * H).await);
        assert!(!claim(12.0 * H).await, "claimed already");
        assert!(!claim(35.0 * H).await, "at most daily");
        assert!(claim(36.0 * H).await);
        // A reminder for a state the node has left is not claimed.
        s.node_transition(t(NodeState::Verifying, 40.0 * H))
            .await
            .unwrap();
        assert!(!claim(80.0 * H).await);
        let fresh = |at: f64| {
            let s = s.clone();
            async move {
                s.claim_node_reminder(
                    "gpu-node-17".into(),
                    40.0 * H,
                    at,
                    12.0 * H,
                    24.0 * H,
                    "{}".into(),
                    Vec::new(),
                )
                .await
                .unwrap()
            }
        };
        assert!(fresh(52.0 * H).await, "a new state starts its own count");
        // Awaiting repair is known: no reminder.
        s.node_transition(t(NodeState::AwaitingRepair, 60.0 * H))
            .await
            .unwrap();
        assert!(!s
            .claim_node_reminder(
                "gpu-node-17".into(),
                60.0 * H,
                100.0 * H,
                12.0 * H,
                24.0 * H,
                "{}".into(),
                Vec::new()
            )
            .await
            .unwrap());
    }

    async fn leaving_again_with_the_same_fault_within_the_window_is_a_repeat(
        s: crate::store::Store,
    ) {
        let xid = |to: NodeState, at: f64, x: &str| {
            let mut tr = t(to, at);
            tr.xid = Some(x.into());
            tr.repeat_window_secs = 7.0 * 24.0 * H;
            tr
        };
        let first = s
            .node_transition(xid(NodeState::Quarantined, 0.0, "79"))
            .await
            .unwrap();
        assert!(!first.row.unwrap().repeat);
        s.node_transition(xid(NodeState::InService, 10.0 * H, "79"))
            .await
            .unwrap();
        // Another fault: not a repeat.
        let other = s
            .node_transition(xid(NodeState::Quarantined, 20.0 * H, "48"))
            .await
            .unwrap();
        assert!(!other.row.unwrap().repeat);
        s.node_transition(xid(NodeState::InService, 30.0 * H, "48"))
            .await
            .unwrap();
        let again = s
            .node_transition(xid(NodeState::Quarantined, 40.0 * H, "48"))
            .await
            .unwrap();
        assert!(
            again.row.unwrap().repeat,
            "XID 48 again a day after its return"
        );
        // It stays a repeat through the stretch, and is listed as one.
        s.node_transition(xid(NodeState::AwaitingRepair, 41.0 * H, "48"))
            .await
            .unwrap();
        assert!(s.node_states().await.unwrap()[0].repeat);
        s.node_transition(xid(NodeState::InService, 50.0 * H, "48"))
            .await
            .unwrap();
        // Past the window: a fault of its own.
        let late = s
            .node_transition(xid(NodeState::Quarantined, 50.0 * H + 8.0 * 24.0 * H, "48"))
            .await
            .unwrap();
        assert!(!late.row.unwrap().repeat);
    }

    async fn transitions_are_decided_against_the_stored_state(s: crate::store::Store) {
        let a = s
            .node_transition(t(NodeState::Quarantined, 100.0))
            .await
            .unwrap();
        assert!(a.changed);
        assert_eq!(a.from, NodeState::InService);
        // The same outcome applied again (another replica): nothing.
        let again = s
            .node_transition(t(NodeState::Quarantined, 150.0))
            .await
            .unwrap();
        assert!(!again.changed);
        assert_eq!(again.row.unwrap().since, 100.0);
        // A return only from a state out of service; never for an unknown node.
        let mut other = t(NodeState::InService, 10.0);
        other.node = "gpu-node-2".into();
        let r = s.node_transition(other).await.unwrap();
        assert!(!r.changed && r.row.is_none());
        let back = s
            .node_transition(t(NodeState::InService, 100.0 + 7200.0))
            .await
            .unwrap();
        assert_eq!(back.lost_gpu_seconds, Some(7200.0 * 8.0));
        let rows = s.node_states().await.unwrap();
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(
            (rows[0].state, rows[0].out_since),
            (NodeState::InService, None)
        );
        let hist = s.node_transitions(0.0).await.unwrap();
        assert_eq!(hist.len(), 2);
        assert_eq!(hist[1].lost_gpu_seconds, Some(57_600.0));
        assert_eq!(hist[1].out_since, Some(100.0));
    }

    /// Two replicas claim the same reminder at once, many times: one wins.
    #[tokio::test]
    #[ignore = "needs PostgreSQL: run by .ci/run"]
    async fn concurrent_reminder_claims_send_one() {
        let url = crate::store::pg::test_url().await.unwrap();
        let a = crate::store::pg::open_url(&url).await.unwrap();
        let b = crate::store::pg::open_url(&url).await.unwrap();
        for i in 0..20 {
            let mut q = t(NodeState::Quarantined, 0.0);
            q.node = format!("gpu-node-{i}");
            a.node_transition(q.clone()).await.unwrap();
            let claim = |s: crate::store::Store, node: String| async move {
                s.claim_node_reminder(
                    node,
                    0.0,
                    13.0 * H,
                    12.0 * H,
                    24.0 * H,
                    "{}".into(),
                    Vec::new(),
                )
                .await
            };
            let (ra, rb) = tokio::join!(
                claim(a.clone(), q.node.clone()),
                claim(b.clone(), q.node.clone())
            );
            assert!(ra.unwrap() != rb.unwrap(), "exactly one claims it");
        }
    }

    /// Two replicas find the same node drained at once, many times: each
    /// node is quarantined once and said once.
    #[tokio::test]
    #[ignore = "needs PostgreSQL: run by .ci/run"]
    async fn concurrent_found_changes_apply_and_are_said_once() {
        let url = crate::store::pg::test_url().await.unwrap();
        let a = crate::store::pg::open_url(&url).await.unwrap();
        let b = crate::store::pg::open_url(&url).await.unwrap();
        for i in 0..20 {
            let mut q = t(NodeState::Quarantined, 100.0);
            q.node = format!("gpu-node-{i}");
            q.from = vec![NodeState::InService];
            q.expect_updated_at = Some(0.0);
            let go = |s: crate::store::Store, q: Transition| async move {
                s.node_transition_announced(q, "{}".into(), vec!["slack:C0REPORTS".into()])
                    .await
                    .unwrap()
            };
            let (ra, rb) = tokio::join!(go(a.clone(), q.clone()), go(b.clone(), q));
            assert!(ra.changed != rb.changed, "exactly one applies it");
        }
        assert_eq!(a.pending().await.unwrap(), 20);
    }

    /// Two replicas apply the same step outcome at once, many times: each
    /// node changes once and has one history row.
    #[tokio::test]
    #[ignore = "needs PostgreSQL: run by .ci/run"]
    async fn concurrent_transitions_apply_once() {
        let url = crate::store::pg::test_url().await.unwrap();
        let a = crate::store::pg::open_url(&url).await.unwrap();
        let b = crate::store::pg::open_url(&url).await.unwrap();
        for i in 0..20 {
            let mut q = t(NodeState::Quarantined, 100.0);
            q.node = format!("gpu-node-{i}");
            let (ra, rb) = tokio::join!(a.node_transition(q.clone()), b.node_transition(q));
            let (ra, rb) = (ra.unwrap(), rb.unwrap());
            assert!(ra.changed != rb.changed, "exactly one applies it");
        }
        let hist = a.node_transitions(0.0).await.unwrap();
        assert_eq!(hist.len(), 20);
        assert_eq!(b.node_states().await.unwrap().len(), 20);
    }
}
