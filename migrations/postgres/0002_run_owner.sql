-- gpuops store schema, version 2 (PostgreSQL): the replica running a run.
-- A replica holds a session advisory lock (7262, hashtext(its name)) while
-- it lives; at start a replica marks `interrupted` only runs whose owner
-- holds no such lock (a dead replica's, or copied from SQLite), never a
-- run another live replica is running.
ALTER TABLE chat_runs ADD COLUMN IF NOT EXISTS owner TEXT;
