CREATE TABLE projects (
    id                TEXT PRIMARY KEY,
    name              TEXT NOT NULL,
    description       TEXT NOT NULL DEFAULT '',
    metadata          JSONB NOT NULL DEFAULT '{}',
    api_key_encrypted TEXT NOT NULL,
    api_key_masked    TEXT NOT NULL,
    is_active         BOOLEAN NOT NULL DEFAULT TRUE,
    created_at        TIMESTAMPTZ NOT NULL,
    updated_at        TIMESTAMPTZ NOT NULL
);

CREATE TABLE tokens (
    id            TEXT PRIMARY KEY,
    project_id    TEXT NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
    token_hash    TEXT NOT NULL UNIQUE,
    expires_at    TIMESTAMPTZ NOT NULL,
    is_active     BOOLEAN NOT NULL DEFAULT TRUE,
    request_count BIGINT NOT NULL DEFAULT 0,
    max_requests  BIGINT,
    created_at    TIMESTAMPTZ NOT NULL,
    last_used_at  TIMESTAMPTZ,
    revoked_at    TIMESTAMPTZ
);
CREATE INDEX tokens_by_project ON tokens(project_id, created_at);

CREATE TABLE audit_events (
    id          BIGSERIAL PRIMARY KEY,
    timestamp   TIMESTAMPTZ NOT NULL,
    actor       TEXT NOT NULL,
    action      TEXT NOT NULL,
    target_type TEXT NOT NULL,
    target_id   TEXT,
    project_id  TEXT,
    outcome     TEXT NOT NULL DEFAULT 'success',
    details     JSONB NOT NULL DEFAULT '{}',
    request_id  TEXT,
    client_ip   TEXT
);
CREATE INDEX audit_by_time ON audit_events(timestamp);
CREATE INDEX audit_by_project ON audit_events(project_id, timestamp);
CREATE INDEX audit_by_target ON audit_events(target_id, timestamp);

-- Every change that can make a cached token stale; other instances follow it to evict. Writers
-- serialise on an advisory lock before inserting, so ids commit in order and a reader that has
-- seen id N has seen every change below it.
CREATE TABLE changes (
    id         BIGSERIAL PRIMARY KEY,
    project_id TEXT,
    token_id   TEXT,
    at         TIMESTAMPTZ NOT NULL
);
