-- The tpm window: [settled at (epoch microseconds, database clock), tokens] of each settled
-- request of the last 60 s, oldest first.
ALTER TABLE tokens ADD COLUMN tpm_log JSONB NOT NULL DEFAULT '[]';
