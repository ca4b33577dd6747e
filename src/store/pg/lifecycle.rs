//! PostgreSQL: nodes out of service (the SQLite side and the types:
//! `store/lifecycle.rs`). A transition inserts the node's row if it is
//! missing (`ON CONFLICT DO NOTHING`), locks it (`SELECT … FOR UPDATE`) and
//! decides against the state it holds, in one transaction: a second
//! replica applying the same step outcome waits for the first, then sees
//! the new state and changes nothing.

use tokio_postgres::Row;

use crate::store::lifecycle::{
    decide, state_of, Applied, NodeRecord, NodeState, Transition, TransitionRecord, NODE_COLUMNS,
};
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
    })
}

impl Pg {
    pub async fn node_transition(&self, t: Transition) -> Result<Applied> {
        self.within(async {
            let mut c = self.client().await?;
            let tx = c.transaction().await?;
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
            let Some((row, lost)) = decide(cur.as_ref(), &t) else {
                tx.commit().await?;
                return Ok(Applied {
                    changed: false,
                    from,
                    row: cur,
                    lost_gpu_seconds: None,
                });
            };
            tx.execute(
                "UPDATE node_states SET state=$2, since=$3, out_since=$4, reason=$5, alert=$6,
                 xid=$7, step=$8, run=$9, by_person=$10, gpus=$11, group_id=$12, updated_at=$13
                 WHERE node=$1",
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
            tx.commit().await?;
            Ok(Applied {
                changed: true,
                from,
                row: Some(row),
                lost_gpu_seconds: lost,
            })
        })
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
