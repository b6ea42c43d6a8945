-- The answers of a tpm-limited token that went out and are not settled yet: mark id -> when it was
-- made (epoch microseconds), removed with the tokens recorded (see proxy/rate_limits.py).
ALTER TABLE tokens ADD COLUMN tpm_marks TEXT NOT NULL DEFAULT '{}';
