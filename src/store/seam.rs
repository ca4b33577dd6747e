//! The store's seam: every query the bot makes, with one signature for both
//! backends. Each line of `seam!` becomes a [`Store`] method that calls the
//! method of the same name on [`Sqlite`](super::sqlite::Sqlite) or
//! [`Pg`](super::pg::Pg); a backend lacking one does not compile. Adding a
//! query: write it in both backends, add its line here.

use std::sync::Arc;
use std::time::Duration;

use crate::store::lifecycle::{Applied, NodeRecord, Transition, TransitionRecord};
use crate::store::paging::{
    DigestDelivery, DigestGroup, EscalationCandidate, EscalationPlan, FiredStep,
};
use crate::store::reports::{IncidentCounts, IncidentGroup, ReportDelivery};
use crate::store::runs::{RunRecord, StepRecord};
use crate::store::{
    AuditRecord, Backend, DeadLetter, GroupHistory, GroupRecord, GroupUpdate, Incident,
    IngestResult, MessageRecord, OutboxRow, Result, Store,
};

/// The text of an escalation step's thread reply: `(group, step, steps)`.
pub type StepText = Arc<dyn Fn(i64, u32, u32) -> String + Send + Sync>;

macro_rules! seam {
    (
        async { $( $(#[$am:meta])* fn $an:ident(&self $(, $aa:ident : $at:ty)*) -> $ar:ty; )* }
        blocking { $( $(#[$bm:meta])* fn $bn:ident(&self $(, $ba:ident : $bt:ty)*) -> $br:ty; )* }
    ) => {
        impl Store {
            $(
                $(#[$am])*
                pub async fn $an(&self $(, $aa: $at)*) -> $ar {
                    match &self.backend {
                        Backend::Sqlite(s) => s.$an($($aa),*).await,
                        Backend::Postgres(p) => p.$an($($aa),*).await,
                    }
                }
            )*
            $(
                $(#[$bm])*
                pub fn $bn(&self $(, $ba: $bt)*) -> $br {
                    match &self.backend {
                        Backend::Sqlite(s) => s.$bn($($ba),*),
                        Backend::Postgres(p) => p.$bn($($ba),*),
                    }
                }
            )*
        }
    };
}

seam! {
    async {
        /// Stores one webhook and its group's new state, and enqueues
        /// deliveries, in one transaction. A state seen before for this
        /// group changes nothing but the raw webhook log.
        fn ingest(&self, raw: String, update: GroupUpdate) -> Result<IngestResult>;
        /// Records an acknowledgement and refreshes the group's messages.
        fn acknowledge(&self, group_id: i64, who: String) -> Result<bool>;
        /// Re-renders every message of a group. Returns the outbox rows touched.
        fn refresh(&self, group_id: i64) -> Result<usize>;
        /// Enqueues a thread reply (a JSON `Message`) at every destination
        /// the group was (or will be) posted to.
        fn enqueue_reply(&self, group_id: i64, body: String) -> Result<usize>;
        fn group(&self, group_id: i64) -> Result<Option<GroupRecord>>;
        fn group_by_key(&self, key: String) -> Result<Option<GroupRecord>>;
        /// Groups currently firing, newest first.
        fn firing_groups(&self, limit: usize) -> Result<Vec<GroupRecord>>;
        fn message(&self, group_id: i64, destination: String) -> Result<Option<MessageRecord>>;
        /// Every message posted for a group.
        fn messages(&self, group_id: i64) -> Result<Vec<MessageRecord>>;
        /// Deletes raw webhooks older than `age`, and groups resolved for
        /// longer than `age` that have nothing pending. Returns rows deleted.
        fn prune(&self, age: Duration) -> Result<usize>;
        /// The PagerDuty incident a correlated P1/P2 group pages into, and
        /// whether another group of it still fires (None: its own incident).
        fn incident(&self, group_id: i64) -> Result<Option<Incident>>;
        /// Records a replay key; `false` when it was seen already (a replay).
        fn first_use(&self, key: [u8; 32], now: i64, keep_secs: i64) -> Result<bool>;
        /// Appends an audit record without logging it (see `Store::audit`).
        fn audit_insert(&self, who: String, action: String, params_json: serde_json::Value, target: Option<String>, outcome: String) -> Result<i64>;
        /// Audit records at or after `since` (Unix seconds), oldest first.
        fn audit_since(&self, since: f64) -> Result<Vec<AuditRecord>>;
        /// Rows in one of the store's tables (tests, `gpuops store copy`).
        fn count_rows(&self, table: &'static str) -> Result<i64>;
        /// Answers when the database does (`/readyz`).
        fn ping(&self) -> Result<()>;
        /// Outbox rows due at `at`, oldest first, only the first of each
        /// (group, destination). PostgreSQL claims them for this replica.
        fn due(&self, at: f64, limit: usize) -> Result<Vec<OutboxRow>>;
        /// Hands back rows `due` returned that this replica will not send
        /// now (their platform is paused, or it is busy): PostgreSQL drops
        /// the claims so any replica may take them; SQLite has none.
        fn release(&self, ids: Vec<i64>) -> Result<()>;
        /// When the earliest pending row becomes due (None: outbox empty).
        fn next_due(&self) -> Result<Option<f64>>;
        fn pending(&self) -> Result<i64>;
        /// An alert row was delivered as `rendered_rev`.
        fn alert_delivered(&self, row: OutboxRow, rendered_rev: i64, channel: String, message_id: String) -> Result<()>;
        /// The platform says the message is gone: forget it.
        fn forget_message(&self, group_id: i64, destination: String) -> Result<()>;
        /// A reply (or any non-alert row) was delivered.
        fn delivered(&self, id: i64) -> Result<()>;
        /// Schedules another attempt.
        fn retry_at(&self, id: i64, at: f64, error: String) -> Result<()>;
        /// Moves a row to the dead letters with the platform's error.
        fn dead_letter(&self, row: OutboxRow, error: String) -> Result<()>;
        fn dead_letters(&self) -> Result<Vec<DeadLetter>>;
        /// Firing, unacknowledged groups of these tiers with no live escalation.
        fn escalation_candidates(&self, tiers: Vec<String>) -> Result<Vec<EscalationCandidate>>;
        /// Starts escalations: `(group, dest, steps, due_at)`.
        fn start_escalations(&self, rows: Vec<(i64, i64, u32, f64)>) -> Result<usize>;
        /// Claims every escalation step due at `at` and enqueues its
        /// deliveries in the same transaction.
        fn fire_due_escalations(&self, at: f64, plans: Vec<EscalationPlan>, text: StepText) -> Result<Vec<FiredStep>>;
        fn next_escalation_due(&self) -> Result<Option<f64>>;
        /// The furthest escalation step a group reached: `(step, steps)`.
        fn escalation_step(&self, group_id: i64) -> Result<Option<(u32, u32)>>;
        /// Escalation rows of a group: `(dest, step, steps, state)`.
        fn escalations(&self, group_id: i64) -> Result<Vec<(i64, u32, u32, String)>>;
        fn last_digest_slot(&self) -> Result<Option<f64>>;
        fn digest_baseline(&self, at: f64) -> Result<()>;
        fn digest_groups(&self, since: f64) -> Result<Vec<DigestGroup>>;
        /// Claims a digest slot and enqueues its deliveries; `false` when
        /// it (or a later one) was claimed already.
        fn claim_digest_slot(&self, slot: f64, late: bool, groups: usize, deliveries: Vec<DigestDelivery>) -> Result<bool>;
        fn digest_slots(&self) -> Result<Vec<(f64, bool, i64)>>;
        /// The latest claimed slot of a report (or its baseline).
        fn last_report_slot(&self, name: String) -> Result<Option<f64>>;
        /// Records a report's first start (no-op once it has any slot).
        fn report_baseline(&self, name: String, at: f64) -> Result<()>;
        /// Claims a report slot and enqueues its deliveries; `false` when
        /// it (or a later one) was claimed already.
        fn claim_report_slot(&self, name: String, slot: f64, late: bool, outcome: String, deliveries: Vec<ReportDelivery>) -> Result<bool>;
        /// Claimed slots of a report, baseline excluded: `(slot, late, outcome)`.
        fn report_slots(&self, name: String) -> Result<Vec<(f64, bool, String)>>;
        /// Enqueues a report sent by hand; the outbox ids.
        fn enqueue_report(&self, deliveries: Vec<ReportDelivery>) -> Result<Vec<i64>>;
        /// Of these outbox rows: how many are pending, and the dead letters' errors.
        fn report_delivery_state(&self, ids: Vec<i64>) -> Result<(usize, Vec<String>)>;
        fn incident_groups(&self, start: f64, end: f64) -> Result<Vec<IncidentGroup>>;
        fn incident_counts(&self, start: f64, end: f64) -> Result<IncidentCounts>;
        fn run(&self, id: &str) -> Result<Option<RunRecord>>;
        fn run_ids(&self) -> Result<Vec<String>>;
        fn waiting_runs(&self) -> Result<i64>;
        fn run_steps(&self, run: &str) -> Result<Vec<StepRecord>>;
        fn insert_run_step(&self, s: StepRecord, run: String) -> Result<()>;
        fn insert_run(&self, rec: RunRecord, now: f64) -> Result<String>;
        fn run_progress(&self, id: &str, next: usize, results: &[(String, String)], now: f64) -> Result<()>;
        fn run_waits_for_approval(&self, id: &str, step: usize, results: &[(String, String)], expires_at: f64, now: f64) -> Result<()>;
        /// Stores the argv each step's approval request showed (step → argv).
        fn set_run_planned(&self, id: &str, planned: &std::collections::BTreeMap<String, Vec<String>>, now: f64) -> Result<()>;
        /// Moves a waiting run to `status` (once: false when someone else did).
        fn decide_run(&self, id: &str, status: &str, who: &str, now: f64) -> Result<bool>;
        fn finish_run(&self, id: &str, status: &str, results: &[(String, String)], now: f64) -> Result<()>;
        /// Marks runs cut off mid-step by a restart `interrupted`.
        fn interrupt_running_runs(&self, now: f64) -> Result<Vec<(String, String, Option<i64>)>>;
        /// Waiting runs whose approval deadline passed.
        fn expired_runs(&self, now: f64) -> Result<Vec<RunRecord>>;
        /// Applies a node's state transition if the stored state allows it,
        /// decided in the database (PostgreSQL: the node's row locked).
        fn node_transition(&self, t: Transition) -> Result<Applied>;
        /// Every node whose state gpuops tracks, by name.
        fn node_states(&self) -> Result<Vec<NodeRecord>>;
        /// Claims a reminder that a node is still out (entered its state at
        /// `since`, at least `min_age` s ago, not reminded within `gap` s)
        /// and enqueues `body` in its incident thread and to `channels`
        /// (the report channels), in one transaction; `false` when not due
        /// or claimed already (another replica).
        #[allow(clippy::too_many_arguments)]
        fn claim_node_reminder(&self, node: String, since: f64, now: f64, min_age: f64, gap: f64, body: String, channels: Vec<String>) -> Result<bool>;
        /// The node's last return to service at or after `since`, with the
        /// fault of the stretch it ended.
        fn node_last_return(&self, node: String, since: f64) -> Result<Option<crate::store::lifecycle::LastReturnAt>>;
        /// Node state transitions at or after `since`, oldest first.
        fn node_transitions(&self, since: f64) -> Result<Vec<TransitionRecord>>;
        /// A transition that, when it changes the node, enqueues `body` to
        /// `channels` in the same transaction (`src/found.rs`).
        fn node_transition_announced(&self, t: Transition, body: String, channels: Vec<String>) -> Result<Applied>;
        /// As `claim_node_reminder`, for any state out of service: the
        /// scheduler shows the node back while gpuops tracks it out.
        #[allow(clippy::too_many_arguments)]
        fn claim_node_notice(&self, node: String, since: f64, now: f64, min_age: f64, gap: f64, body: String, channels: Vec<String>) -> Result<bool>;
        /// The given parameters and alert labels of every run in progress.
        fn active_runs(&self) -> Result<Vec<crate::store::lifecycle::ActiveRun>>;
    }
    blocking {
        /// Appends an audit record (blocking; CLI and tests).
        fn audit_blocking(&self, who: &str, action: &str, params_json: &serde_json::Value, target: Option<&str>, outcome: &str) -> Result<i64>;
        /// A group with its delivery history (`gpuops audit --group`).
        fn group_history_blocking(&self, group_id: i64) -> Result<Option<GroupHistory>>;
        fn audit_since_blocking(&self, since: f64) -> Result<Vec<AuditRecord>>;
        /// Creates the run tables if they are missing (at start).
        fn create_runs_table(&self) -> Result<()>;
        /// A run by id, and its stored steps (`gpuops audit --run`).
        fn run_with_steps_blocking(&self, id: &str) -> Result<Option<(RunRecord, Vec<StepRecord>)>>;
        /// The runs of an alert group, oldest first, each with its steps.
        fn runs_of_group_blocking(&self, group: i64) -> Result<Vec<(RunRecord, f64, Vec<StepRecord>)>>;
    }
}
