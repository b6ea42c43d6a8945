-- Usage aggregates: one row per token per UTC clock hour, added to in batches by the usage
-- dispatcher, after the requests were answered.
-- No foreign key to tokens: rows are written asynchronously and may arrive after the token's
-- project was deleted, and the traffic of deleted projects still belongs in the totals.
CREATE TABLE usage_hourly (
    token_id          TEXT NOT NULL,
    project_id        TEXT NOT NULL,
    hour              TIMESTAMPTZ NOT NULL,
    requests          BIGINT NOT NULL DEFAULT 0,
    prompt_tokens     BIGINT NOT NULL DEFAULT 0,
    completion_tokens BIGINT NOT NULL DEFAULT 0,
    total_tokens      BIGINT NOT NULL DEFAULT 0,
    errors            BIGINT NOT NULL DEFAULT 0,
    last_used_at      TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (token_id, hour)
);
CREATE INDEX usage_by_project ON usage_hourly(project_id, hour);
CREATE INDEX usage_by_hour ON usage_hourly(hour);
