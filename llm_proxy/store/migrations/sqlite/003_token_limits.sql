-- Limits a withering token may carry beyond max_requests, and what it has spent. Money is kept in
-- whole nano-dollars (1e-9 USD): integers add up exactly, and the cheapest request (a few
-- embedding tokens) still costs a whole number of them.
ALTER TABLE tokens ADD COLUMN rpm INTEGER;
ALTER TABLE tokens ADD COLUMN tpm INTEGER;
ALTER TABLE tokens ADD COLUMN budget_nanousd INTEGER;
ALTER TABLE tokens ADD COLUMN spent_nanousd INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tokens ADD COLUMN reserved_nanousd INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tokens ADD COLUMN allowed_models TEXT;  -- JSON list of globs; NULL: any model
ALTER TABLE tokens ADD COLUMN metadata TEXT NOT NULL DEFAULT '{}';
-- When each request of the last 60 s was admitted (epoch microseconds, JSON list, oldest first):
-- the rpm window, exact in any rolling minute.
ALTER TABLE tokens ADD COLUMN rpm_log TEXT NOT NULL DEFAULT '[]';
ALTER TABLE usage_hourly ADD COLUMN cost_nanousd INTEGER NOT NULL DEFAULT 0;
