-- The tpm window: [admitted at (epoch microseconds), tokens] of each settled request of the last
-- 60 s, oldest first, as a JSON list.
ALTER TABLE tokens ADD COLUMN tpm_log TEXT NOT NULL DEFAULT '[]';
