-- gpuops store schema, version 5 (PostgreSQL): plans before approvals.
-- chat_runs.planned: JSON object, step name -> the argv its plan resolved
-- (absolute paths) and the approval request showed; an approval covers
-- exactly that argv, which is what the bot signs when the approval arrives.
ALTER TABLE chat_runs ADD COLUMN IF NOT EXISTS planned TEXT NOT NULL DEFAULT '{}';
