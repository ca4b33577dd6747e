-- gpuops store schema, version 1 (SQLite). Every statement is IF NOT EXISTS, so
-- it also adopts a database made by a gpuops from before versioned migrations.
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
CREATE TABLE IF NOT EXISTS escalations (
    group_id INTEGER NOT NULL,
    dest INTEGER NOT NULL,
    step INTEGER NOT NULL,
    steps INTEGER NOT NULL,
    due_at REAL,
    state TEXT NOT NULL,
    started_at REAL NOT NULL,
    PRIMARY KEY (group_id, dest)
);
CREATE INDEX IF NOT EXISTS escalations_due ON escalations(state, due_at);
CREATE TABLE IF NOT EXISTS digest_slots (
    slot REAL PRIMARY KEY,
    claimed_at REAL NOT NULL,
    late INTEGER NOT NULL,
    groups INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS chat_runs (
    id TEXT PRIMARY KEY,
    runbook TEXT NOT NULL,
    only_steps TEXT,
    given TEXT NOT NULL,
    labels TEXT NOT NULL,
    group_id INTEGER,
    requester TEXT NOT NULL,
    requester_name TEXT NOT NULL,
    requester_role TEXT NOT NULL,
    status TEXT NOT NULL,
    next_step INTEGER NOT NULL,
    results TEXT NOT NULL,
    expires_at REAL,
    decided_by TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS chat_runs_status ON chat_runs(status, expires_at);
CREATE TABLE IF NOT EXISTS chat_run_steps (
    run_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    step TEXT NOT NULL,
    status TEXT NOT NULL,
    exit_code INTEGER,
    duration_secs REAL NOT NULL,
    output TEXT NOT NULL,
    truncated INTEGER NOT NULL,
    approved_by TEXT,
    at REAL NOT NULL,
    PRIMARY KEY (run_id, seq)
);
