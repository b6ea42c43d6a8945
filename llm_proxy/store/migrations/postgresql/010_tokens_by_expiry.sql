-- Tokens expired longer than EXPIRED_TOKEN_RETENTION_DAYS ago are deleted now and then (see
-- store/retention.py): found by their expiry, not by a scan of every token ever issued.
-- An index only: the release before serves on it as it did without it.
-- serves-from: 009
-- Built CONCURRENTLY: a plain build holds a SHARE lock on tokens for as long as it takes, and
-- every request's write to its token would wait behind it.
CREATE INDEX CONCURRENTLY IF NOT EXISTS tokens_by_expiry ON tokens(expires_at);
