"""SQLite backend through aiosqlite: WAL, foreign keys, one connection, SQL kept in this module."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import aiosqlite
import orjson

from llm_proxy.models import (
    RATE_WINDOW_MICROS,
    AuditEntry,
    AuditEvent,
    AuditFilter,
    BudgetHold,
    Claim,
    IssueForm,
    Project,
    RateSlot,
    RevokeCounts,
    Token,
    TokenGrant,
    UsageDelta,
    UsageRollup,
    UsageTotals,
    budget_spent,
    hour_start,
    tpm_room,
    utcnow,
    with_marks,
)
from llm_proxy.store.migrations import migration_scripts, refuse_newer, serves_from
from llm_proxy.store.records import (
    FORGET_ISSUE_FORMS_AT_ONCE,
    PROJECT_COLUMNS,
    TOKEN_COLUMNS,
    check_columns,
    with_revoke_counts,
)

_LOCK_WAIT_SECONDS = 5.0


def _ts(moment: datetime) -> str:
    # Fixed width, so text order is time order in indexes and comparisons. The year is padded
    # here: strftime's %Y writes year 999 as "999" on glibc, which sorts after "2026".
    utc = moment.astimezone(UTC)
    return f"{utc.year:04d}-{utc:%m-%dT%H:%M:%S.%f}Z"


def _parse_ts(text: str | None) -> datetime | None:
    # fromisoformat, not the far slower strptime: a list of tokens reads four per row, and the
    # tokens of months (kept once expired) held up the event loop while strptime read them.
    return None if text is None else datetime.fromisoformat(text)


def _db_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return _ts(value)
    if isinstance(value, dict | list | tuple):
        return orjson.dumps(value).decode()
    if isinstance(value, bool):
        return int(value)
    return value


def _project(row: aiosqlite.Row) -> Project:
    return Project(
        id=row["id"],
        name=row["name"],
        description=row["description"],
        metadata=orjson.loads(row["metadata"]),
        is_active=bool(row["is_active"]),
        created_at=_parse_ts(row["created_at"]) or utcnow(),
        updated_at=_parse_ts(row["updated_at"]) or utcnow(),
        api_key_masked=row["api_key_masked"],
        api_key_encrypted=row["api_key_encrypted"],
    )


_USAGE_SUMS = (
    "COALESCE(SUM(requests), 0) AS requests, COALESCE(SUM(prompt_tokens), 0) AS prompt_tokens,"
    " COALESCE(SUM(completion_tokens), 0) AS completion_tokens,"
    " COALESCE(SUM(total_tokens), 0) AS total_tokens, COALESCE(SUM(errors), 0) AS errors,"
    " COALESCE(SUM(cost_nanousd), 0) AS cost_nanousd, MAX(last_used_at) AS last_used_at"
)


def _usage(row: aiosqlite.Row | None) -> UsageTotals:
    if row is None:
        return UsageTotals()
    return UsageTotals(
        requests=row["requests"],
        prompt_tokens=row["prompt_tokens"],
        completion_tokens=row["completion_tokens"],
        total_tokens=row["total_tokens"],
        errors=row["errors"],
        last_used_at=_parse_ts(row["last_used_at"]),
        cost_nanousd=row["cost_nanousd"],
    )


def _token(row: aiosqlite.Row) -> Token:
    return Token(
        id=row["id"],
        project_id=row["project_id"],
        expires_at=_parse_ts(row["expires_at"]) or utcnow(),
        is_active=bool(row["is_active"]),
        request_count=row["request_count"],
        max_requests=row["max_requests"],
        created_at=_parse_ts(row["created_at"]) or utcnow(),
        last_used_at=_parse_ts(row["last_used_at"]),
        revoked_at=_parse_ts(row["revoked_at"]),
        rpm=row["rpm"],
        tpm=row["tpm"],
        budget_nanousd=row["budget_nanousd"],
        spent_nanousd=row["spent_nanousd"],
        reserved_nanousd=row["reserved_nanousd"],
        budget_refused_nanousd=row["budget_refused_nanousd"],
        allowed_models=_models(row["allowed_models"]),
        metadata=orjson.loads(row["metadata"]),
    )


def _models(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(orjson.loads(text))


# The changes after a cursor, in order; and one naming nothing, which says that anything may have
# changed, when the feed's newest id is below the cursor (a database file restored from a backup;
# at that id) or its oldest is past the cursor's next (what followed the cursor was pruned; just
# before the oldest, so it comes first). MIN and MAX in subqueries of their own: each is then one
# step down the primary key.
_CHANGES_SINCE = """
SELECT id, project_id, token_id FROM changes WHERE id > ?1
UNION ALL
SELECT CASE WHEN latest < ?1 THEN latest ELSE oldest - 1 END, NULL, NULL FROM (
    SELECT COALESCE((SELECT MAX(id) FROM changes), 0) AS latest,
           (SELECT MIN(id) FROM changes) AS oldest
) WHERE latest < ?1 OR oldest > ?1 + 1
ORDER BY id
"""

# The head of the feed up to its first change made since ?1, within its ?2 + 1 oldest changes,
# but for the last change before that: a reader that read it missed nothing, and must not be told
# to start over when the ids that follow it have a gap (PostgreSQL's do, after a rolled-back change
# or a restart). So the newest change always stays: with none left, the ids would look as if they
# started again.
# (No WITH: the sqlite3 module counts no rows for a statement that does not start with DELETE.)
_PRUNE_CHANGES = """
DELETE FROM changes
WHERE id < (
    SELECT MAX(id) FROM changes WHERE id < COALESCE(
        (SELECT MIN(id) FROM (SELECT id, at FROM changes ORDER BY id LIMIT ?2 + 1) WHERE at >= ?1),
        (SELECT MAX(id) FROM (SELECT id FROM changes ORDER BY id LIMIT ?2 + 1)) + 1
    )
)
"""

P = ParamSpec("P")
R = TypeVar("R")


def _writes(
    method: Callable[Concatenate[SqliteStore, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[SqliteStore, P], Coroutine[Any, Any, R]]:
    """Run a method as one write transaction.

    The connection is shared, so transactions are serialised in-process by a lock (an interleaved
    commit from another coroutine would otherwise commit half of this one). ``BEGIN IMMEDIATE``
    takes the write lock up front: a deferred transaction that reads and then writes fails at once
    with "database is locked" when another process committed in between, instead of waiting.

    The transaction runs to its end in a task of its own, whatever happens to its caller: a caller
    cancelled while ``BEGIN`` was under way (a client that hung up during admission) left the
    shared connection inside a transaction, and every later write failed with "cannot start a
    transaction within a transaction".
    """

    async def locked(self: SqliteStore, /, *args: P.args, **kwargs: P.kwargs) -> R:
        async def transaction() -> R:
            async with self._write_lock:
                await self._begin_immediate()
                try:
                    result = await method(self, *args, **kwargs)
                except BaseException:
                    await self._db.execute("ROLLBACK")
                    raise
                await self._db.execute("COMMIT")
                return result

        return await asyncio.shield(transaction())

    return locked


class SqliteStore:
    """The embedded default. All writes go through one connection, so they never contend."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db
        self._write_lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path, *, migrate: bool = True) -> SqliteStore:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Autocommit mode: transactions are opened explicitly by the write decorator.
        db = aiosqlite.connect(path, isolation_level=None)
        try:
            await db
        except BaseException:
            # A connection that failed to open stops its worker thread without waiting for it,
            # and the thread then posts to this loop, which a failed start is about to close
            # ("Event loop is closed", a traceback after the one-line error). Waiting for it
            # here keeps the loop open until the thread has finished.
            await asyncio.to_thread(db._thread.join)
            raise
        try:
            db.row_factory = aiosqlite.Row
            await db.execute("PRAGMA busy_timeout=5000")
            store = cls(db)
            # Switching to WAL and migrating take locks that SQLite's busy handler does not wait
            # for when several processes start at once: retry them for a bounded time.
            await store._retry_locked(lambda: db.execute("PRAGMA journal_mode=WAL"))
            await db.execute("PRAGMA synchronous=NORMAL")
            await db.execute("PRAGMA foreign_keys=ON")
            if migrate:
                await store.migrate()
        except BaseException:
            await db.close()
            raise
        return store

    async def _retry_locked(self, operation: Callable[[], Awaitable[Any]]) -> None:
        delay = 0.001
        deadline = time.monotonic() + _LOCK_WAIT_SECONDS
        while True:
            try:
                await operation()
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)

    async def migrate(self) -> list[int]:
        """Apply the migrations this database lacks, in order; the versions applied."""
        applied: list[int] = []
        await self._retry_locked(lambda: self._migrate(applied))
        return applied

    async def _migrate(self, applied_now: list[int]) -> None:
        await self._db.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT)"
        )
        # Each migration's serves-from marker (migrations.py) has a table of its own: releases
        # before it insert (version, applied_at) into schema_migrations without naming the
        # columns, which SQLite refuses once the table has a third one.
        await self._db.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations_serves_from"
            " (version INTEGER PRIMARY KEY, serves_from INTEGER NOT NULL)"
        )
        async with self._db.execute(
            "SELECT version, serves_from FROM schema_migrations"
            " LEFT JOIN schema_migrations_serves_from USING (version)"
        ) as cur:
            recorded = {row[0]: row[1] for row in await cur.fetchall()}
        refuse_newer(recorded, "sqlite")
        for version, sql in migration_scripts("sqlite"):
            if version in recorded:
                continue
            marker = serves_from(sql)
            marking = (
                f"INSERT OR REPLACE INTO schema_migrations_serves_from VALUES ({version}, {marker});"
                if marker is not None
                else ""
            )
            # Recording the version first makes a concurrent start-up (several workers) fail on the
            # primary key instead of applying the same migration twice.
            script = (
                "BEGIN IMMEDIATE;\nINSERT INTO schema_migrations (version, applied_at)"
                f" VALUES ({version}, '{_ts(utcnow())}');{marking}\n{sql}\nCOMMIT;"
            )
            try:
                await self._db.executescript(script)
            except sqlite3.IntegrityError:
                await self._db.execute("ROLLBACK")
            else:
                applied_now.append(version)

    async def _begin_immediate(self) -> None:
        # SQLite's busy handler is skipped in some WAL lock races (another process checkpointing or
        # starting up), so "database is locked" can come back at once.
        await self._retry_locked(lambda: self._db.execute("BEGIN IMMEDIATE"))

    async def close(self) -> None:
        await self._db.close()

    async def ping(self) -> None:
        async with self._db.execute("SELECT 1") as cur:
            await cur.fetchone()

    # -- helpers -------------------------------------------------------------------------------

    async def _audit(self, entry: AuditEntry) -> None:
        await self._db.execute(
            "INSERT INTO audit_events (timestamp, actor, action, target_type, target_id, project_id,"
            " outcome, details, request_id, client_ip) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (
                _ts(utcnow()),
                entry.actor,
                entry.action,
                entry.target_type,
                entry.target_id,
                entry.project_id,
                entry.outcome,
                orjson.dumps(entry.details).decode(),
                entry.request_id,
                entry.client_ip,
            ),
        )

    async def _changed(self, project_id: str | None, token_id: str | None) -> None:
        await self._db.execute(
            "INSERT INTO changes (project_id, token_id, at) VALUES (?,?,?)",
            (project_id, token_id, _ts(utcnow())),
        )

    async def _one(self, sql: str, params: Sequence[Any]) -> aiosqlite.Row | None:
        async with self._db.execute(sql, params) as cur:
            row: aiosqlite.Row | None = await cur.fetchone()
            return row

    async def _all(self, sql: str, params: Sequence[Any] = ()) -> list[aiosqlite.Row]:
        async with self._db.execute(sql, params) as cur:
            return list(await cur.fetchall())

    # -- projects ------------------------------------------------------------------------------

    @_writes
    async def create_project(self, project: Project, audit: AuditEntry) -> Project:
        await self._db.execute(
            "INSERT INTO projects (id, name, description, metadata, api_key_encrypted, api_key_masked,"
            " is_active, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?)",
            (
                project.id,
                project.name,
                project.description,
                orjson.dumps(project.metadata).decode(),
                project.api_key_encrypted,
                project.api_key_masked,
                int(project.is_active),
                _ts(project.created_at),
                _ts(project.updated_at),
            ),
        )
        await self._audit(audit)
        return project

    async def get_project(self, project_id: str) -> Project | None:
        row = await self._one("SELECT * FROM projects WHERE id = ?", (project_id,))
        return _project(row) if row else None

    async def list_projects(self) -> list[Project]:
        return [_project(r) for r in await self._all("SELECT * FROM projects ORDER BY created_at")]

    @_writes
    async def update_project(
        self,
        project_id: str,
        changes: dict[str, Any],
        audit: AuditEntry,
        *,
        revoke_tokens: bool = False,
    ) -> Project | None:
        check_columns("project", changes, PROJECT_COLUMNS)
        assignments = ", ".join(f"{column} = ?" for column in changes)
        values = [_db_value(v) for v in changes.values()]
        sql = (
            f"UPDATE projects SET {assignments}{', ' if changes else ''}updated_at = ? WHERE id = ?"
        )
        cur = await self._db.execute(sql, (*values, _ts(utcnow()), project_id))
        if cur.rowcount == 0:
            return None
        if revoke_tokens:
            audit = with_revoke_counts(audit, await self._revoke_tokens_of(project_id))
        await self._changed(project_id, None)
        await self._audit(audit)
        return await self.get_project(project_id)

    @_writes
    async def delete_project(self, project_id: str, audit: AuditEntry) -> bool:
        cur = await self._db.execute("DELETE FROM projects WHERE id = ?", (project_id,))
        if cur.rowcount == 0:
            return False
        await self._changed(project_id, None)
        await self._audit(audit)
        return True

    @_writes
    async def revoke_project_tokens(
        self, project_id: str, audit: AuditEntry | None
    ) -> RevokeCounts:
        counts = await self._revoke_tokens_of(project_id)
        await self._changed(project_id, None)
        if audit is not None:
            await self._audit(with_revoke_counts(audit, counts))
        return counts

    async def _revoke_tokens_of(self, project_id: str) -> RevokeCounts:
        row = await self._one(
            "SELECT COUNT(*) AS total, SUM(is_active = 0) AS inactive FROM tokens WHERE project_id = ?",
            (project_id,),
        )
        total = row["total"] if row else 0
        already = (row["inactive"] or 0) if row else 0
        cur = await self._db.execute(
            "UPDATE tokens SET is_active = 0, revoked_at = ? WHERE project_id = ? AND is_active = 1",
            (_ts(utcnow()), project_id),
        )
        return RevokeCounts(cur.rowcount, already, total)

    # -- tokens --------------------------------------------------------------------------------

    @_writes
    async def create_token(self, token: Token, token_hash: str, audit: AuditEntry) -> Token:
        await self._db.execute(
            "INSERT INTO tokens (id, project_id, token_hash, expires_at, is_active, request_count,"
            " max_requests, created_at, rpm, tpm, budget_nanousd, allowed_models, metadata)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                token.id,
                token.project_id,
                token_hash,
                _ts(token.expires_at),
                int(token.is_active),
                token.request_count,
                token.max_requests,
                _ts(token.created_at),
                token.rpm,
                token.tpm,
                token.budget_nanousd,
                None if token.allowed_models is None else _db_value(token.allowed_models),
                orjson.dumps(token.metadata).decode(),
            ),
        )
        await self._audit(audit)
        return token

    async def get_token(self, token_id: str) -> Token | None:
        row = await self._one("SELECT * FROM tokens WHERE id = ?", (token_id,))
        return _token(row) if row else None

    async def list_tokens(self, project_id: str | None = None) -> list[Token]:
        if project_id is None:
            rows = await self._all("SELECT * FROM tokens ORDER BY created_at")
        else:
            rows = await self._all(
                "SELECT * FROM tokens WHERE project_id = ? ORDER BY created_at", (project_id,)
            )
        # Expired tokens are kept: the rows of months of them are read in a worker thread, so
        # the event loop keeps answering meanwhile.
        return await asyncio.to_thread(lambda: [_token(r) for r in rows])

    async def find_token_id_by_hash(self, token_hash: str) -> str | None:
        row = await self._one("SELECT id FROM tokens WHERE token_hash = ?", (token_hash,))
        return row["id"] if row else None

    async def grant_for_hash(self, token_hash: str) -> TokenGrant | None:
        row = await self._one(
            "SELECT t.*, p.is_active AS project_is_active, p.api_key_encrypted"
            " FROM tokens t JOIN projects p ON p.id = t.project_id WHERE t.token_hash = ?",
            (token_hash,),
        )
        if row is None:
            return None
        return TokenGrant(_token(row), bool(row["project_is_active"]), row["api_key_encrypted"])

    @_writes
    async def update_token(
        self, token_id: str, changes: dict[str, Any], audit: AuditEntry
    ) -> Token | None:
        check_columns("token", changes, TOKEN_COLUMNS)
        if changes:
            assignments = ", ".join(f"{column} = ?" for column in changes)
            values = [_db_value(v) for v in changes.values()]
            cur = await self._db.execute(
                f"UPDATE tokens SET {assignments} WHERE id = ?", (*values, token_id)
            )
            if cur.rowcount == 0:
                return None
        token = await self.get_token(token_id)
        if token is None:
            return None
        await self._changed(token.project_id, token_id)
        await self._audit(audit)
        return token

    # -- accounting ----------------------------------------------------------------------------

    @_writes
    async def consume_request(self, token_id: str, at: datetime) -> Claim | None:
        row = await self._one(
            "UPDATE tokens SET request_count = request_count + 1, last_used_at = ?"
            " WHERE id = ? AND is_active = 1"
            " AND (max_requests IS NULL OR request_count < max_requests)"
            " RETURNING request_count, max_requests",
            (_ts(at), token_id),
        )
        return None if row is None else Claim(int(row["request_count"]), row["max_requests"])

    @_writes
    async def release_request(self, token_id: str) -> None:
        await self._db.execute(
            "UPDATE tokens SET request_count = request_count - 1 WHERE id = ? AND request_count > 0",
            (token_id,),
        )

    @_writes
    async def take_rate_slot(self, token_id: str) -> RateSlot:
        # Writes are serialised (one connection, BEGIN IMMEDIATE across processes), so reading
        # the window, checking and writing it back is one atomic step.
        row = await self._one("SELECT rpm, rpm_log FROM tokens WHERE id = ?", (token_id,))
        if row is None or row["rpm"] is None:
            return RateSlot(True)
        now = time.time_ns() // 1000
        window = [at for at in orjson.loads(row["rpm_log"]) if at > now - RATE_WINDOW_MICROS]
        if len(window) >= row["rpm"]:
            oldest = window[len(window) - row["rpm"]]
            return RateSlot(False, retry_after=(oldest + RATE_WINDOW_MICROS - now) / 1e6)
        now = max(now, window[-1] + 1) if window else now  # distinct, in order
        window.append(now)
        await self._db.execute(
            "UPDATE tokens SET rpm_log = ? WHERE id = ?", (orjson.dumps(window).decode(), token_id)
        )
        return RateSlot(True, at_micros=now)

    @_writes
    async def give_back_rate_slot(self, token_id: str, at_micros: int) -> None:
        row = await self._one("SELECT rpm_log FROM tokens WHERE id = ?", (token_id,))
        if row is None:
            return
        window = [at for at in orjson.loads(row["rpm_log"]) if at != at_micros]
        await self._db.execute(
            "UPDATE tokens SET rpm_log = ? WHERE id = ?", (orjson.dumps(window).decode(), token_id)
        )

    async def tpm_room(self, token_id: str, mark_bound: int = 0, upto: int = 0) -> RateSlot:
        row = await self._one(
            "SELECT tpm, tpm_log, tpm_marks FROM tokens WHERE id = ?", (token_id,)
        )
        if row is None or row["tpm"] is None:
            return RateSlot(True)
        log = [(at, tokens) for at, tokens in orjson.loads(row["tpm_log"])]
        now = time.time_ns() // 1000
        room = tpm_room(log, now, row["tpm"])
        return with_marks(room, orjson.loads(row["tpm_marks"]).values(), now, mark_bound, upto)

    @_writes
    async def mark_answered(self, token_id: str, mark: str, bound: int) -> None:
        row = await self._one("SELECT tpm_marks FROM tokens WHERE id = ?", (token_id,))
        if row is None:
            return
        now = time.time_ns() // 1000
        marks = {k: at for k, at in orjson.loads(row["tpm_marks"]).items() if at > now - bound}
        marks[mark] = now
        await self._db.execute(
            "UPDATE tokens SET tpm_marks = ? WHERE id = ?", (orjson.dumps(marks).decode(), token_id)
        )

    @_writes
    async def forget_mark(self, token_id: str, mark: str) -> None:
        await self._db.execute(
            "UPDATE tokens SET tpm_marks = json_remove(tpm_marks, ?) WHERE id = ?",
            (f'$."{mark}"', token_id),
        )

    @_writes
    async def record_tokens(self, token_id: str, tokens: int, mark: str = "") -> None:
        row = await self._one("SELECT tpm_log, tpm_marks FROM tokens WHERE id = ?", (token_id,))
        if row is None:
            return
        now = time.time_ns() // 1000
        log = [e for e in orjson.loads(row["tpm_log"]) if e[0] > now - RATE_WINDOW_MICROS]
        log.append([now, tokens])
        marks = orjson.loads(row["tpm_marks"])
        marks.pop(mark, None)
        await self._db.execute(
            "UPDATE tokens SET tpm_log = ?, tpm_marks = ? WHERE id = ?",
            (orjson.dumps(log).decode(), orjson.dumps(marks).decode(), token_id),
        )

    @_writes
    async def reserve_budget(
        self,
        token_id: str,
        hold_id: str,
        want_nanousd: int,
        minimum_nanousd: int,
        hold_seconds: float,
    ) -> BudgetHold:
        # Writes are serialised (one connection, BEGIN IMMEDIATE across processes), so reading
        # the room, checking it and taking the hold is one atomic step.
        row = await self._one(
            "SELECT budget_nanousd, spent_nanousd, reserved_nanousd FROM tokens WHERE id = ?",
            (token_id,),
        )
        if row is None or row["budget_nanousd"] is None:
            return BudgetHold(True, 0, 0)
        budget, spent = row["budget_nanousd"], row["spent_nanousd"]
        room = budget - spent - row["reserved_nanousd"]
        if room < minimum_nanousd:
            exhausted = budget_spent(budget, spent, minimum_nanousd)
            return BudgetHold(False, 0, max(room, 0), exhausted=exhausted)
        amount = min(want_nanousd, room)
        await self._db.execute(
            "UPDATE tokens SET reserved_nanousd = reserved_nanousd + ? WHERE id = ?",
            (amount, token_id),
        )
        await self._db.execute(
            "INSERT INTO budget_holds (id, token_id, nanousd, expires_at) VALUES (?,?,?,?)",
            (hold_id, token_id, amount, time.time_ns() // 1000 + round(hold_seconds * 1e6)),
        )
        return BudgetHold(True, amount, room - amount)

    @_writes
    async def note_budget_refused(
        self, token_id: str, budget_nanousd: int, minimum_nanousd: int
    ) -> None:
        await self._db.execute(
            "UPDATE tokens SET budget_refused_nanousd = MIN(COALESCE(budget_refused_nanousd, ?), ?)"
            " WHERE id = ? AND budget_nanousd = ?",
            (minimum_nanousd, minimum_nanousd, token_id, budget_nanousd),
        )

    @_writes
    async def settle_budget(self, token_id: str, hold_id: str, cost_nanousd: int) -> None:
        await self._settle_budgets([(token_id, hold_id, cost_nanousd)])

    @_writes
    async def settle_budgets(self, settlements: Sequence[tuple[str, str, int]]) -> None:
        await self._settle_budgets(settlements)

    async def _settle_budgets(self, settlements: Sequence[tuple[str, str, int]]) -> None:
        # Per token: what its settled holds kept, and what they cost.
        totals: dict[str, list[int]] = {}
        for token_id, hold_id, cost in settlements:
            held = 0
            if hold_id:
                row = await self._one(
                    "DELETE FROM budget_holds WHERE id = ? AND token_id = ? RETURNING nanousd",
                    (hold_id, token_id),
                )
                held = 0 if row is None else row["nanousd"]  # None: reclaimed meanwhile
            total = totals.setdefault(token_id, [0, 0])
            total[0] += held
            total[1] += cost
        await self._db.executemany(
            "UPDATE tokens SET reserved_nanousd = MAX(reserved_nanousd - ?, 0),"
            " spent_nanousd = spent_nanousd + ? WHERE id = ?",
            [(held, cost, token_id) for token_id, (held, cost) in totals.items()],
        )

    @_writes
    async def renew_budget_holds(self, hold_ids: Sequence[str], hold_seconds: float) -> None:
        if not hold_ids:
            return
        await self._db.execute(
            "UPDATE budget_holds SET expires_at = ? WHERE id IN (SELECT value FROM json_each(?))",
            (time.time_ns() // 1000 + round(hold_seconds * 1e6), orjson.dumps(hold_ids).decode()),
        )

    @_writes
    async def reclaim_budget_holds(self) -> int:
        gone = await self._all(
            "DELETE FROM budget_holds WHERE expires_at <= ? RETURNING token_id, nanousd",
            (time.time_ns() // 1000,),
        )
        freed: dict[str, int] = {}
        for row in gone:
            freed[row["token_id"]] = freed.get(row["token_id"], 0) + row["nanousd"]
        await self._db.executemany(
            "UPDATE tokens SET reserved_nanousd = MAX(reserved_nanousd - ?, 0) WHERE id = ?",
            [(amount, token_id) for token_id, amount in freed.items()],
        )
        return len(gone)

    @_writes
    async def add_usage(self, deltas: Sequence[UsageDelta]) -> None:
        if not deltas:
            return
        await self._db.executemany(
            "UPDATE tokens SET request_count = request_count + ?,"
            " last_used_at = MAX(COALESCE(last_used_at, ''), ?) WHERE id = ?",
            [(d.requests, _ts(d.last_used_at), d.token_id) for d in deltas],
        )

    # -- usage aggregates ----------------------------------------------------------------------

    @_writes
    async def add_usage_rollup(self, rows: Sequence[UsageRollup]) -> None:
        if not rows:
            return
        await self._db.executemany(
            "INSERT INTO usage_hourly (token_id, project_id, hour, requests, prompt_tokens,"
            " completion_tokens, total_tokens, errors, last_used_at, cost_nanousd)"
            " VALUES (?,?,?,?,?,?,?,?,?,?)"
            " ON CONFLICT (token_id, hour) DO UPDATE SET"
            " requests = requests + excluded.requests,"
            " prompt_tokens = prompt_tokens + excluded.prompt_tokens,"
            " completion_tokens = completion_tokens + excluded.completion_tokens,"
            " total_tokens = total_tokens + excluded.total_tokens,"
            " errors = errors + excluded.errors,"
            " cost_nanousd = cost_nanousd + excluded.cost_nanousd,"
            " last_used_at = MAX(last_used_at, excluded.last_used_at)",
            [
                (
                    r.token_id,
                    r.project_id,
                    _ts(hour_start(r.hour)),
                    r.requests,
                    r.prompt_tokens,
                    r.completion_tokens,
                    r.total_tokens,
                    r.errors,
                    _ts(r.last_used_at),
                    r.cost_nanousd,
                )
                for r in rows
            ],
        )

    async def token_usage(self, token_id: str) -> UsageTotals:
        return _usage(
            await self._one(
                f"SELECT {_USAGE_SUMS} FROM usage_hourly WHERE token_id = ?", (token_id,)
            )
        )

    async def project_usage(self, project_id: str) -> UsageTotals:
        return _usage(
            await self._one(
                f"SELECT {_USAGE_SUMS} FROM usage_hourly WHERE project_id = ?", (project_id,)
            )
        )

    async def project_token_usage(self, project_id: str) -> dict[str, UsageTotals]:
        rows = await self._all(
            f"SELECT token_id, {_USAGE_SUMS} FROM usage_hourly WHERE project_id = ?"
            " GROUP BY token_id",
            (project_id,),
        )
        return {row["token_id"]: _usage(row) for row in rows}

    async def usage_since(self, since: datetime) -> UsageTotals:
        return _usage(
            await self._one(
                f"SELECT {_USAGE_SUMS} FROM usage_hourly WHERE hour >= ?",
                (_ts(hour_start(since)),),
            )
        )

    async def usage_by_hour(
        self, since: datetime, *, project_id: str | None = None, token_id: str | None = None
    ) -> list[tuple[datetime, UsageTotals]]:
        where, params = ["hour >= ?"], [_ts(hour_start(since))]
        if project_id is not None:
            where.append("project_id = ?")
            params.append(project_id)
        if token_id is not None:
            where.append("token_id = ?")
            params.append(token_id)
        rows = await self._all(
            f"SELECT hour, {_USAGE_SUMS} FROM usage_hourly WHERE {' AND '.join(where)}"
            " GROUP BY hour ORDER BY hour",
            params,
        )
        return [(_parse_ts(row["hour"]) or since, _usage(row)) for row in rows]

    @_writes
    async def prune_usage_hourly(self, before: datetime) -> int:
        async with self._db.execute(
            "DELETE FROM usage_hourly WHERE hour < ?", (_ts(hour_start(before)),)
        ) as cursor:
            return cursor.rowcount

    @_writes
    async def prune_audit(self, before: datetime, at_most: int) -> int:
        async with self._db.execute(
            "DELETE FROM audit_events WHERE id IN"
            " (SELECT id FROM audit_events WHERE timestamp < ? ORDER BY timestamp, id LIMIT ?)",
            (_ts(before), at_most),
        ) as cursor:
            return cursor.rowcount

    @_writes
    async def prune_expired_tokens(self, before: datetime, at_most: int) -> int:
        async with self._db.execute(
            "DELETE FROM tokens WHERE id IN"
            " (SELECT id FROM tokens WHERE expires_at < ? ORDER BY expires_at LIMIT ?)",
            (_ts(before), at_most),
        ) as cursor:
            return cursor.rowcount

    async def latest_change(self) -> int:
        row = await self._one("SELECT COALESCE(MAX(id), 0) AS latest FROM changes", ())
        return int(row["latest"]) if row else 0

    async def changes_since(self, cursor: int) -> tuple[int, list[tuple[str | None, str | None]]]:
        # As PostgreSQL's: a row naming nothing when the ids started again below the cursor (a
        # database file restored from a backup), or changes after it were pruned.
        rows = await self._all(_CHANGES_SINCE, (cursor,))
        if not rows:
            return cursor, []
        return rows[-1]["id"], [(r["project_id"], r["token_id"]) for r in rows]

    @_writes
    async def prune_changes(self, before: datetime, at_most: int) -> int:
        async with self._db.execute(_PRUNE_CHANGES, (_ts(before), at_most)) as cursor:
            return cursor.rowcount

    async def listen_changes(self, wake: Callable[[], None], connected: Callable[[], None]) -> None:
        """No push channel: the processes sharing the file follow the polled feed."""
        return None

    # -- issue forms ---------------------------------------------------------------------------

    @_writes
    async def claim_issue_form(self, form_id: str, remember_seconds: float) -> bool:
        now = time.time_ns() // 1000
        await self._db.execute(
            "DELETE FROM issue_forms WHERE form_id IN (SELECT form_id FROM issue_forms"
            " WHERE claimed_at < ? ORDER BY claimed_at LIMIT ?)",
            (now - round(remember_seconds * 1e6), FORGET_ISSUE_FORMS_AT_ONCE),
        )
        claimed = await self._one(
            "INSERT INTO issue_forms (form_id, claimed_at) VALUES (?, ?)"
            " ON CONFLICT (form_id) DO NOTHING RETURNING form_id",
            (form_id, now),
        )
        return claimed is not None

    @_writes
    async def release_issue_form(self, form_id: str) -> None:
        await self._db.execute(
            "DELETE FROM issue_forms WHERE form_id = ? AND token_id IS NULL", (form_id,)
        )

    @_writes
    async def record_issue_form(self, form_id: str, token_id: str) -> None:
        await self._db.execute(
            "INSERT INTO issue_forms (form_id, token_id, claimed_at) VALUES (?, ?, ?)"
            " ON CONFLICT (form_id) DO UPDATE SET token_id = excluded.token_id",
            (form_id, token_id, time.time_ns() // 1000),
        )

    async def issue_form(self, form_id: str) -> IssueForm | None:
        row = await self._one(
            "SELECT token_id, shown FROM issue_forms WHERE form_id = ?", (form_id,)
        )
        return None if row is None else IssueForm(row["token_id"], bool(row["shown"]))

    @_writes
    async def show_issue_form(self, form_id: str, token_id: str) -> bool:
        # Writes are serialised (one connection, BEGIN IMMEDIATE across processes), and the row
        # comes back only when this statement inserted it or changed it from unshown.
        marked = await self._one(
            "INSERT INTO issue_forms (form_id, token_id, claimed_at, shown) VALUES (?, ?, ?, 1)"
            " ON CONFLICT (form_id) DO UPDATE SET shown = 1 WHERE shown = 0 RETURNING form_id",
            (form_id, token_id, time.time_ns() // 1000),
        )
        return marked is not None

    # -- audit ---------------------------------------------------------------------------------

    async def list_audit(
        self, filters: AuditFilter, page: int, page_size: int
    ) -> tuple[list[AuditEvent], int]:
        clauses: list[str] = []
        params: list[Any] = []
        for column in ("actor", "action", "target_type", "target_id", "project_id", "outcome"):
            value = getattr(filters, column)
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        if filters.since is not None:
            clauses.append("timestamp >= ?")
            params.append(_ts(filters.since))
        if filters.until is not None:
            clauses.append("timestamp < ?")
            params.append(_ts(filters.until))
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        total_row = await self._one(f"SELECT COUNT(*) AS n FROM audit_events{where}", params)
        rows = await self._all(
            f"SELECT * FROM audit_events{where} ORDER BY id DESC LIMIT ? OFFSET ?",
            (*params, page_size, (page - 1) * page_size),
        )
        events = [
            AuditEvent(
                id=r["id"],
                timestamp=_parse_ts(r["timestamp"]) or utcnow(),
                entry=AuditEntry(
                    actor=r["actor"],
                    action=r["action"],
                    target_type=r["target_type"],
                    target_id=r["target_id"],
                    project_id=r["project_id"],
                    details=orjson.loads(r["details"]),
                    request_id=r["request_id"],
                    client_ip=r["client_ip"],
                    outcome=r["outcome"],
                ),
            )
            for r in rows
        ]
        return events, int(total_row["n"]) if total_row else 0
