-- Usage aggregates: one row per token per UTC clock hour, added to in batches by the usage
-- dispatcher, after the requests were answered.
-- No foreign key to tokens: rows are written asynchronously and may arrive after the token's
-- project was deleted (a foreign key would then refuse the whole batch, again and again), and
-- the traffic of deleted projects still belongs in the dashboard's totals.
CREATE TABLE usage_hourly (
    token_id          TEXT NOT NULL,
    project_id        TEXT NOT NULL,
    hour              TEXT NOT NULL,  -- start of the hour, in the store's fixed-width format
    requests          INTEGER NOT NULL DEFAULT 0,
    prompt_tokens     INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    total_tokens      INTEGER NOT NULL DEFAULT 0,
    errors            INTEGER NOT NULL DEFAULT 0,
    last_used_at      TEXT NOT NULL,
    PRIMARY KEY (token_id, hour)
) WITHOUT ROWID;
CREATE INDEX usage_by_project ON usage_hourly(project_id, hour);
CREATE INDEX usage_by_hour ON usage_hourly(hour);
