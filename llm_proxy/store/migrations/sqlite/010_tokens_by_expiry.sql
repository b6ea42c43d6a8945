-- Tokens expired longer than EXPIRED_TOKEN_RETENTION_DAYS ago are deleted now and then (see
-- store/retention.py): found by their expiry, not by a scan of every token ever issued.
-- An index only: the release before serves on it as it did without it.
-- serves-from: 009
CREATE INDEX tokens_by_expiry ON tokens(expires_at);
