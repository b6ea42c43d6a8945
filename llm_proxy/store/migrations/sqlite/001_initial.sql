CREATE TABLE projects (
    id                TEXT PRIMARY KEY,
    name              TEXT NOT NULL,
    description       TEXT NOT NULL DEFAULT '',
    metadata          TEXT NOT NULL DEFAULT '{}',
    api_key_encrypted TEXT NOT NULL,
    api_key_masked    TEXT NOT NULL,
    is_active         INTEGER NOT NULL DEFAULT 1,
    created_at        TEXT NOT NULL,
    updated_at        TEXT NOT NULL
);

CREATE TABLE tokens (
    id            TEXT PRIMARY KEY,
    project_id    TEXT NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
    token_hash    TEXT NOT NULL UNIQUE,
    expires_at    TEXT NOT NULL,
    is_active     INTEGER NOT NULL DEFAULT 1,
    request_count INTEGER NOT NULL DEFAULT 0,
    max_requests  INTEGER,
    created_at    TEXT NOT NULL,
    last_used_at  TEXT,
    revoked_at    TEXT
);
CREATE INDEX tokens_by_project ON tokens(project_id, created_at);

CREATE TABLE audit_events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    timestamp   TEXT NOT NULL,
    actor       TEXT NOT NULL,
    action      TEXT NOT NULL,
    target_type TEXT NOT NULL,
    target_id   TEXT,
    project_id  TEXT,
    outcome     TEXT NOT NULL DEFAULT 'success',
    details     TEXT NOT NULL DEFAULT '{}',
    request_id  TEXT,
    client_ip   TEXT
);
CREATE INDEX audit_by_time ON audit_events(timestamp);
CREATE INDEX audit_by_project ON audit_events(project_id, timestamp);
CREATE INDEX audit_by_target ON audit_events(target_id, timestamp);

-- Every change that can make a cached token stale; other processes poll it to evict.
CREATE TABLE changes (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    project_id TEXT,
    token_id   TEXT,
    at         TEXT NOT NULL
);
