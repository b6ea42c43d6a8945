-- Budget holds: what each request in flight on a budgeted token may still cost. Admitting such a
-- request adds its hold to tokens.reserved_nanousd and writes it here, in one write transaction;
-- settling deletes it and moves the actual cost to spent_nanousd. A hold outlives a process that
-- died between the two, so each carries its expiry (epoch microseconds, like rpm_log), and expired
-- holds are deleted and returned to their tokens' budgets.
CREATE TABLE budget_holds (
    id         TEXT PRIMARY KEY,
    token_id   TEXT NOT NULL REFERENCES tokens(id) ON DELETE CASCADE,
    nanousd    INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);
-- Reclaiming finds the expired holds by expiry; deleting a token finds its holds by token (the
-- cascade would otherwise scan the table).
CREATE INDEX budget_holds_by_expiry ON budget_holds(expires_at);
CREATE INDEX budget_holds_by_token ON budget_holds(token_id);
