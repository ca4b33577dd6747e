-- gpuops store schema, version 4 (SQLite): plans before approvals.
-- chat_runs.planned: JSON object, step name -> the argv its plan resolved
-- (absolute paths) and the approval request showed; an approval covers
-- exactly that argv, which is what the bot signs when the approval arrives.
ALTER TABLE chat_runs ADD COLUMN planned TEXT NOT NULL DEFAULT '{}';
