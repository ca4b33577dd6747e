-- gpuops store schema, version 3 (SQLite): one PagerDuty incident per fault.
-- incident_subjects: a subject of P1/P2 alerts ("<instance>|<gpu>") and the
-- group whose PagerDuty incident it pages into, with when it was last seen
-- firing; a group about the same subject within the correlation window
-- shares that incident. group_incidents: the incident (a group id) each
-- correlated P1/P2 group pages into, decided once, at its first ingest.
CREATE TABLE IF NOT EXISTS incident_subjects (
    subject TEXT PRIMARY KEY,
    incident_group_id INTEGER NOT NULL,
    last_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS group_incidents (
    group_id INTEGER PRIMARY KEY,
    incident_group_id INTEGER NOT NULL,
    linked_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS group_incidents_by_incident ON group_incidents(incident_group_id);
