-- The answers of a tpm-limited token that went out and are not settled yet: mark id -> when it was
-- made (epoch microseconds), removed with the tokens recorded (see proxy/rate_limits.py).
-- No serves-from: a release before this one writes no marks, so the tpm windows this one reads
-- would be wrong while it served.
ALTER TABLE tokens ADD COLUMN tpm_marks JSONB NOT NULL DEFAULT '{}';
