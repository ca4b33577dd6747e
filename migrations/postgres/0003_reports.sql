-- gpuops store schema, version 3 (PostgreSQL): claimed health-report slots.
-- One row per (report, slot), claimed in the same transaction that
-- enqueues the report's deliveries (under an advisory lock per report, so
-- two replicas at the same slot enqueue once); outcome 'baseline' marks a
-- report's first start (slots before it are not owed).
CREATE TABLE IF NOT EXISTS report_slots (
    name TEXT NOT NULL,
    slot DOUBLE PRECISION NOT NULL,
    claimed_at DOUBLE PRECISION NOT NULL,
    late BIGINT NOT NULL,
    outcome TEXT NOT NULL,
    PRIMARY KEY (name, slot)
);
