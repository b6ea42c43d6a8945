-- Tokens expired longer than EXPIRED_TOKEN_RETENTION_DAYS ago are deleted now and then (see
-- store/retention.py): found by their expiry, not by a scan of every token ever issued.
CREATE INDEX tokens_by_expiry ON tokens(expires_at);
