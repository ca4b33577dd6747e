-- gpuops store schema, version 4 (SQLite): nodes out of service
-- (`src/lifecycle.rs`). node_states: one row per node gpuops has seen leave
-- service: its state (in_service, quarantined, awaiting_repair, verifying),
-- since when, when its current stretch out of service began (NULL in
-- service), why (reason, alert, xid, step), the run, the person who acted,
-- its GPUs, and the alert group whose thread is its incident timeline.
-- is_repeat: it left service again with the same fault (alert or XID)
-- within [lifecycle] repeat_window of its return. reminded_at: the last
-- reminder that it is still out, claimed by a conditional UPDATE in the
-- transaction that enqueues it (once per day across restarts and replicas).
-- node_transitions: every change, for GPU-hours lost (a return records the
-- stretch's GPU-seconds).
CREATE TABLE IF NOT EXISTS node_states (
    node TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    since REAL NOT NULL,
    out_since REAL,
    reason TEXT NOT NULL,
    alert TEXT,
    xid TEXT,
    step TEXT,
    run TEXT,
    by_person TEXT,
    gpus INTEGER NOT NULL,
    group_id INTEGER,
    updated_at REAL NOT NULL,
    is_repeat INTEGER NOT NULL DEFAULT 0,
    reminded_at REAL
);
CREATE TABLE IF NOT EXISTS node_transitions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    node TEXT NOT NULL,
    from_state TEXT NOT NULL,
    to_state TEXT NOT NULL,
    at REAL NOT NULL,
    reason TEXT NOT NULL,
    alert TEXT,
    xid TEXT,
    step TEXT,
    run TEXT,
    by_person TEXT,
    gpus INTEGER NOT NULL,
    group_id INTEGER,
    out_since REAL,
    lost_gpu_seconds REAL
);
CREATE INDEX IF NOT EXISTS node_transitions_by_node ON node_transitions(node, at);
