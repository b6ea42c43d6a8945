-- One-time ids of the admin pages' issue forms. The post that inserts an id's row issues its token
-- (every other post of the same form finds the row and follows the first to its page), and the
-- page showing the value marks it shown once, whichever process or instance serves either.
-- token_id is NULL while the first post is issuing; the value itself is never stored. Rows are
-- forgotten once their form's CSRF token has expired (claimed_at: epoch microseconds).
CREATE TABLE issue_forms (
    form_id    TEXT PRIMARY KEY,
    token_id   TEXT,
    claimed_at INTEGER NOT NULL,
    shown      INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX issue_forms_by_claim ON issue_forms(claimed_at);
