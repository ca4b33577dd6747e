-- gpuops store schema, version 2 (SQLite): claimed health-report slots.
-- One row per (report, slot), claimed in the same transaction that
-- enqueues the report's deliveries; outcome 'baseline' marks a report's
-- first start (slots before it are not owed).
CREATE TABLE IF NOT EXISTS report_slots (
    name TEXT NOT NULL,
    slot REAL NOT NULL,
    claimed_at REAL NOT NULL,
    late INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    PRIMARY KEY (name, slot)
);
