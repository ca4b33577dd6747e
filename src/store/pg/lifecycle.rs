//! PostgreSQL: nodes out of service (the SQLite side and the types:
//! `store/lifecycle.rs`). A transition inserts the node's row if it is
//! missing (`ON CONFLICT DO NOTHING`), locks it (`SELECT … FOR UPDATE`) and
//! decides against the state it holds, in one transaction: a second
//! replica applying the same step outcome waits for the first, then sees
//! the new state and changes nothing.

use tokio_postgres::Row;

use crate::store::lifecycle::{
    active_run, decide, leaves_service, state_of, ActiveRun, Applied, LastReturnAt, NodeRecord,
    NodeState, Transition, TransitionRecord, ACTIVE_RUNS, LAST_RETURN, LAST_RETURN_AT,
    NODE_COLUMNS, NOTICE_STATES, REMINDED_STATES,
};
use crate::store::pg::core::{group_destinations, lock_group};
use crate::store::pg::{get, Pg};
use crate::store::Result;

fn node_row(r: &Row) -> Result<NodeRecord> {
    Ok(NodeRecord {
        node: get(r, 0)?,
        state: state_of(&get::<String>(r, 1)?)?,
        since: get(r, 2)?,
        out_since: get(r, 3)?,
        reason: get(r, 4)?,
        alert: get(r, 5)?,
        xid: get(r, 6)?,
        step: get(r, 7)?,
        run: get(r, 8)?,
        by: get(r, 9)?,
        gpus: get(r, 10)?,
        group_id: get(r, 11)?,
        updated_at: get(r, 12)?,
        repeat: get::<i64>(r, 13)? != 0,
        reminded_at: get(r, 14)?,
    })
}

/// Enqueues `body` to each of `channels` as a post of its own (no thread).
async fn enqueue_posts(
    tx: &tokio_postgres::Transaction<'_>,
    body: &str,
    channels: &[String],
) -> Result<()> {
    let t = crate::store::now();
    for d in channels {
        tx.execute(
            "INSERT INTO outbox(group_id, destination, kind, rev, body, created_at, next_attempt_at)
             VALUES (0, $1, 'reply', 0, $2, $3, $3)",
            &[d, &body, &t],
        )
        .await?;
    }
    Ok(())
}

/// A transition in `tx` (not committed).
async fn node_tx(tx: &tokio_postgres::Transaction<'_>, t: &Transition) -> Result<Applied> {
    // A placeholder in service, so there is a row to lock.
    tx.execute(
        "INSERT INTO node_states(node, state, since, reason, gpus, updated_at)
         VALUES ($1, $2, $3, '', 0, $3) ON CONFLICT (node) DO NOTHING",
        &[&t.node, &NodeState::InService.as_str(), &t.at],
    )
    .await?;
    let cur = tx
        .query_opt(
            &format!("SELECT {NODE_COLUMNS} FROM node_states WHERE node=$1 FOR UPDATE"),
            &[&t.node],
        )
        .await?
        .map(|r| node_row(&r))
        .transpose()?
        // A placeholder is no history.
        .filter(|r| !r.reason.is_empty());
    let from = cur
        .as_ref()
        .map(|r| r.state)
        .unwrap_or(NodeState::InService);
    let last_return = if leaves_service(cur.as_ref(), t) && t.repeat_window_secs > 0.0 {
        let sql = LAST_RETURN.replace("?1", "$1").replace("?2", "$2");
        match tx
            .query_opt(&sql, &[&t.node, &(t.at - t.repeat_window_secs)])
            .await?
        {
            Some(r) => Some((get(&r, 0)?, get(&r, 1)?)),
            None => None,
        }
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
    tx.execute(
        "UPDATE node_states SET state=$2, since=$3, out_since=$4, reason=$5, alert=$6,
         xid=$7, step=$8, run=$9, by_person=$10, gpus=$11, group_id=$12, updated_at=$13,
         is_repeat=$14, reminded_at=NULL WHERE node=$1",
        &[
            &row.node,
            &row.state.as_str(),
            &row.since,
            &row.out_since,
            &row.reason,
            &row.alert,
            &row.xid,
            &row.step,
            &row.run,
            &row.by,
            &row.gpus,
            &row.group_id,
            &row.updated_at,
            &i64::from(row.repeat),
        ],
    )
    .await?;
    let prev_out = cur.as_ref().and_then(|r| r.out_since);
    tx.execute(
        "INSERT INTO node_transitions(node, from_state, to_state, at, reason, alert, xid,
         step, run, by_person, gpus, group_id, out_since, lost_gpu_seconds)
         VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14)",
        &[
            &row.node,
            &from.as_str(),
            &row.state.as_str(),
            &row.since,
            &row.reason,
            &row.alert,
            &row.xid,
            &row.step,
            &row.run,
            &row.by,
            &row.gpus,
            &row.group_id,
            &prev_out,
            &lost,
        ],
    )
    .await?;
    Ok(Applied {
        changed: true,
        from,
        row: Some(row),
        lost_gpu_seconds: lost,
    })
}

impl Pg {
    pub async fn node_transition(&self, t: Transition) -> Result<Applied> {
        self.within(async {
            let mut c = self.client().await?;
            let tx = c.transaction().await?;
            let a = node_tx(&tx, &t).await?;
            tx.commit().await?;
            Ok(a)
        })
        .await
    }

    pub async fn node_transition_announced(
        &self,
        t: Transition,
        body: String,
        channels: Vec<String>,
    ) -> Result<Applied> {
        self.within(async {
            let mut c = self.client().await?;
            let tx = c.transaction().await?;
            let a = node_tx(&tx, &t).await?;
            if a.changed {
                enqueue_posts(&tx, &body, &channels).await?;
            }
            tx.commit().await?;
            Ok(a)
        })
        .await
    }

    pub async fn active_runs(&self) -> Result<Vec<ActiveRun>> {
        self.within(async {
            let c = self.client().await?;
            let rows = c.query(ACTIVE_RUNS, &[]).await?;
            rows.iter()
                .map(|r| Ok(active_run(&get::<String>(r, 0)?, &get::<String>(r, 1)?)))
                .collect()
        })
        .await
    }

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
        self.claim(
            NOTICE_STATES,
            node,
            since,
            now,
            min_age,
            gap,
            body,
            channels,
        )
        .await
    }

    pub async fn node_states(&self) -> Result<Vec<NodeRecord>> {
        self.within(async {
            let c = self.client().await?;
            let rows = c
                .query(
                    &format!(
                        "SELECT {NODE_COLUMNS} FROM node_states WHERE reason != '' ORDER BY node"
                    ),
                    &[],
                )
                .await?;
            rows.iter().map(node_row).collect()
        })
        .await
    }

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
        self.claim(
            REMINDED_STATES,
            node,
            since,
            now,
            min_age,
            gap,
            body,
            channels,
        )
        .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn claim(
        &self,
        states: &str,
        node: String,
        since: f64,
        now: f64,
        min_age: f64,
        gap: f64,
        body: String,
        channels: Vec<String>,
    ) -> Result<bool> {
        self.within(async {
            let mut c = self.client().await?;
            let tx = c.transaction().await?;
            // One statement: a second replica's UPDATE waits for the row,
            // then sees reminded_at and matches nothing.
            let claimed = tx
                .query_opt(
                    &format!(
                        "UPDATE node_states SET reminded_at=$3
                         WHERE node=$1 AND since=$2 AND state IN {states}
                           AND since <= $4 AND (reminded_at IS NULL OR reminded_at <= $5)
                         RETURNING group_id"
                    ),
                    &[&node, &since, &now, &(now - min_age), &(now - gap)],
                )
                .await?;
            let Some(row) = claimed else {
                tx.commit().await?;
                return Ok(false);
            };
            if let Some(g) = get::<Option<i64>>(&row, 0)? {
                lock_group(&tx, g).await?;
                let t = crate::store::now();
                for d in group_destinations(&tx, g).await? {
                    tx.execute(
                        "INSERT INTO outbox(group_id, destination, kind, rev, body, created_at, next_attempt_at)
                         VALUES ($1, $2, 'reply', 0, $3, $4, $4)",
                        &[&g, &d, &body, &t],
                    )
                    .await?;
                }
            }
            // The report channels: a post of its own (no thread).
            enqueue_posts(&tx, &body, &channels).await?;
            tx.commit().await?;
            Ok(true)
        })
        .await
    }

    pub async fn node_last_return(&self, node: String, since: f64) -> Result<Option<LastReturnAt>> {
        self.within(async {
            let c = self.client().await?;
            let sql = LAST_RETURN_AT.replace("?1", "$1").replace("?2", "$2");
            match c.query_opt(&sql, &[&node, &since]).await? {
                Some(r) => Ok(Some(LastReturnAt {
                    at: get(&r, 0)?,
                    alert: get(&r, 1)?,
                    xid: get(&r, 2)?,
                })),
                None => Ok(None),
            }
        })
        .await
    }

    pub async fn node_transitions(&self, since: f64) -> Result<Vec<TransitionRecord>> {
        self.within(async {
            let c = self.client().await?;
            let rows = c
                .query(
                    "SELECT node, from_state, to_state, at, reason, by_person, gpus, out_since,
                     lost_gpu_seconds FROM node_transitions WHERE at >= $1 ORDER BY id",
                    &[&since],
                )
                .await?;
            rows.iter()
                .map(|r| {
                    Ok(TransitionRecord {
                        node: get(r, 0)?,
                        from: state_of(&get::<String>(r, 1)?)?,
                        to: state_of(&get::<String>(r, 2)?)?,
                        at: get(r, 3)?,
                        reason: get(r, 4)?,
                        by: get(r, 5)?,
                        gpus: get(r, 6)?,
                        out_since: get(r, 7)?,
                        lost_gpu_seconds: get(r, 8)?,
                    })
                })
                .collect()
        })
        .await
    }
}
