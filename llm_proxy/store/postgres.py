"""PostgreSQL backend through asyncpg: a connection pool, SQL kept in this module.

asyncpg prepares every statement on first use and keeps it in each connection's statement cache,
so the hot queries (the token lookup by hash, the quota claim, the change feed) are parsed and
planned once per connection, not once per call.

Changes that can make a cached token stale are rows of ``changes``, written in the transaction of
the change and announced with ``NOTIFY`` (delivered at commit): instances ``LISTEN`` on a
connection of their own and read the feed from their cursor when woken. Writers serialise on an
advisory lock before taking a change id, so ids become visible in order and a reader that has seen
id N has seen every change below it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from functools import partial
from typing import Any

import asyncpg
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
from llm_proxy.store.postgres_migrations import apply_migrations
from llm_proxy.store.postgres_url import split_connect_timeout
from llm_proxy.store.records import (
    FORGET_ISSUE_FORMS_AT_ONCE,
    PROJECT_COLUMNS,
    TOKEN_COLUMNS,
    check_columns,
    with_revoke_counts,
)
from llm_proxy.store.unavailable import (
    ClaimInDoubt,
    CommitInDoubt,
    FateUnknown,
    UnreadableDatabaseUrl,
    without_credentials,
)

CHANGES_CHANNEL = "llm_proxy_changes"
# How this process's connections are named in pg_stat_activity.
POOL_NAME = "llm-proxy"
LISTENER_NAME = "llm-proxy-listen"
# Arbitrary, fixed keys of the advisory locks: one serialises change ids, one the reclaiming of
# expired budget holds (migrations take another: postgres_migrations.MIGRATION_LOCK).
_CHANGES_LOCK = 0x6C6C_6D70_0001
_RECLAIM_LOCK = 0x6C6C_6D70_0003
# How long a query, or waiting for a pooled connection, may take before the caller is told the
# database is unavailable: a hung database must not hold requests for ever.
_TIMEOUT = 5.0

# A pooled connection, as the pool lends it.
Conn = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy

# SUM over BIGINT is NUMERIC in PostgreSQL: cast back, so totals stay integers.
_USAGE_SUMS = (
    "COALESCE(SUM(requests), 0)::BIGINT AS requests,"
    " COALESCE(SUM(prompt_tokens), 0)::BIGINT AS prompt_tokens,"
    " COALESCE(SUM(completion_tokens), 0)::BIGINT AS completion_tokens,"
    " COALESCE(SUM(total_tokens), 0)::BIGINT AS total_tokens,"
    " COALESCE(SUM(errors), 0)::BIGINT AS errors,"
    " COALESCE(SUM(cost_nanousd), 0)::BIGINT AS cost_nanousd, MAX(last_used_at) AS last_used_at"
)


# The rpm window in one statement: ``now`` (microseconds, database clock) joins the requests of the
# last 60 s when there are fewer than ``rpm`` of them; the row comes back either way (``taken``
# NULL when refused) with how long until the oldest counted request leaves the window. A clock
# that steps back never reorders the log: a slot is always later than the last one. That oldest
# request is looked up only in a full window: a subscript is a 32-bit integer, which an rpm over
# 2^31 would overflow below it, failing every request of the token.
_TAKE_RATE_SLOT = """
WITH now AS (
    SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::BIGINT AS at
), current AS (
    SELECT t.id, t.rpm,
           ARRAY(SELECT x FROM unnest(t.rpm_log) AS x WHERE x > now.at - $2 ORDER BY x) AS recent,
           now.at
    FROM tokens t, now WHERE t.id = $1 AND t.rpm IS NOT NULL
), taken AS (
    UPDATE tokens t
    SET rpm_log = array_append(
        ARRAY(SELECT x FROM unnest(t.rpm_log) AS x WHERE x > c.at - $2 ORDER BY x),
        GREATEST(c.at, COALESCE((SELECT max(x) FROM unnest(t.rpm_log) AS x), 0) + 1)
    )
    FROM current c
    WHERE t.id = c.id
      AND cardinality(ARRAY(SELECT x FROM unnest(t.rpm_log) AS x WHERE x > c.at - $2)) < t.rpm
    RETURNING t.rpm_log[cardinality(t.rpm_log)] AS slot
)
SELECT (SELECT slot FROM taken) AS taken,
       CASE WHEN cardinality(c.recent) >= c.rpm
            THEN c.recent[(cardinality(c.recent) - c.rpm + 1)::INT] + $2 - c.at
       END AS retry_after_micros
FROM current c
"""


_RATE_ATTEMPTS = 3

_NOW_MICROS = "(extract(epoch FROM clock_timestamp()) * 1000000)::BIGINT"

# Taking a hold, once the token's row is locked and the room checked: the reservation grows and the
# hold is written, expiring by the database's clock.
_TAKE_BUDGET_HOLD = f"""
WITH reserved AS (
    UPDATE tokens SET reserved_nanousd = reserved_nanousd + $3 WHERE id = $2
)
INSERT INTO budget_holds (id, token_id, nanousd, expires_at)
VALUES ($1, $2, $3, {_NOW_MICROS} + $4::BIGINT)
"""

# A hold (if still there) leaves the reservation and the cost joins the spend, in one statement.
# A settlement racing the reclaiming of the same hold waits for it and then finds no row to delete,
# so the hold leaves the reservation once.
_SETTLE_BUDGET = """
WITH gone AS (
    DELETE FROM budget_holds WHERE id = $2 AND token_id = $1 RETURNING nanousd
)
UPDATE tokens
SET reserved_nanousd = GREATEST(reserved_nanousd - COALESCE((SELECT nanousd FROM gone), 0), 0),
    spent_nanousd = spent_nanousd + $3
WHERE id = $1
"""

# The holds of requests still running expire later. One locked by a settlement or the reclaiming
# is skipped, as it is on its way out: waiting for it would lock these rows in another order than
# a batch of settlements does, and the two could deadlock.
_RENEW_BUDGET_HOLDS = f"""
UPDATE budget_holds SET expires_at = {_NOW_MICROS} + $2::BIGINT
WHERE id IN (SELECT id FROM budget_holds WHERE id = ANY($1::TEXT[]) FOR UPDATE SKIP LOCKED)
"""

# Every expired hold leaves the table and its token's reservation; the count comes back.
_RECLAIM_BUDGET_HOLDS = f"""
WITH gone AS (
    DELETE FROM budget_holds WHERE expires_at <= {_NOW_MICROS} RETURNING token_id, nanousd
), freed AS (
    SELECT token_id, sum(nanousd)::BIGINT AS nanousd FROM gone GROUP BY token_id
), returned AS (
    UPDATE tokens t SET reserved_nanousd = GREATEST(t.reserved_nanousd - f.nanousd, 0)
    FROM freed f WHERE t.id = f.token_id
)
SELECT count(*) FROM gone
"""


# The changes after a cursor, in order; or, when the feed's newest id is below the cursor (the
# ids started again lower: a database restored from a backup, a failover to a replica without the
# last changes; at the newest id) or its oldest is past the cursor's next (what followed the cursor
# was pruned; just before the oldest, so it comes first), one row naming nothing, which says that
# anything may have changed. (An id the sequence gave to a transaction that rolled back may so
# read as pruned: that errs on the side of reloading.)
_CHANGES_SINCE = """
SELECT id, project_id, token_id FROM changes WHERE id > $1
UNION ALL
SELECT CASE WHEN latest < $1 THEN latest ELSE oldest - 1 END, NULL, NULL FROM (
    SELECT COALESCE((SELECT MAX(id) FROM changes), 0) AS latest,
           (SELECT MIN(id) FROM changes) AS oldest
) AS feed
WHERE latest < $1 OR oldest > $1 + 1
ORDER BY id
"""

# The head of the feed up to its first change made since $1, within its $2 + 1 oldest changes,
# but for the last change before that: a reader that read it missed nothing, and must not be told
# to start over when the ids that follow it have a gap (a rolled-back change, a restart: the
# sequence runs ahead). So the newest change always stays: with none left, the ids would look as
# if they started again. Only the head, so that a change stamped early by a clock behind the
# others never leaves a hole that a reader past it could not tell from nothing.
_PRUNE_CHANGES = """
WITH head AS (SELECT id, at FROM changes ORDER BY id LIMIT $2 + 1),
boundary AS (
    SELECT COALESCE((SELECT MIN(id) FROM head WHERE at >= $1), (SELECT MAX(id) FROM head) + 1) AS id
)
DELETE FROM changes
WHERE id < (SELECT MAX(id) FROM changes WHERE id < (SELECT id FROM boundary))
"""


async def _prepare_connection(conn: asyncpg.Connection) -> None:
    # JSON columns in and out as Python values, through orjson.
    await conn.set_type_codec(
        "jsonb",
        encoder=lambda value: orjson.dumps(value).decode(),
        decoder=orjson.loads,
        schema="pg_catalog",
    )


# The columns this release reads, named rather than ``*``: during a rolling upgrade a newer
# release's migration adds columns while this one still serves, and PostgreSQL refuses a prepared
# statement whose result would change shape ("cached statement plan is invalid"), which inside a
# transaction fails the call (asyncpg retries it only outside one). A named column list keeps its
# shape, so the statement is simply planned again.
_PROJECT_READ_COLUMNS = (
    "id, name, description, metadata, is_active, created_at, updated_at, api_key_masked,"
    " api_key_encrypted"
)
_TOKEN_READ_FIELDS = (
    "id",
    "project_id",
    "expires_at",
    "is_active",
    "request_count",
    "max_requests",
    "created_at",
    "last_used_at",
    "revoked_at",
    "rpm",
    "tpm",
    "budget_nanousd",
    "spent_nanousd",
    "reserved_nanousd",
    "budget_refused_nanousd",
    "allowed_models",
    "metadata",
)
_TOKEN_READ_COLUMNS = ", ".join(_TOKEN_READ_FIELDS)
_GRANT_READ_COLUMNS = ", ".join(f"t.{field}" for field in _TOKEN_READ_FIELDS)
_AUDIT_READ_COLUMNS = (
    "id, timestamp, actor, action, target_type, target_id, project_id, details, request_id,"
    " client_ip, outcome"
)


def _project(row: asyncpg.Record) -> Project:
    return Project(
        id=row["id"],
        name=row["name"],
        description=row["description"],
        metadata=row["metadata"],
        is_active=row["is_active"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        api_key_masked=row["api_key_masked"],
        api_key_encrypted=row["api_key_encrypted"],
    )


def _token(row: asyncpg.Record) -> Token:
    return Token(
        id=row["id"],
        project_id=row["project_id"],
        expires_at=row["expires_at"],
        is_active=row["is_active"],
        request_count=row["request_count"],
        max_requests=row["max_requests"],
        created_at=row["created_at"],
        last_used_at=row["last_used_at"],
        revoked_at=row["revoked_at"],
        rpm=row["rpm"],
        tpm=row["tpm"],
        budget_nanousd=row["budget_nanousd"],
        spent_nanousd=row["spent_nanousd"],
        reserved_nanousd=row["reserved_nanousd"],
        budget_refused_nanousd=row["budget_refused_nanousd"],
        allowed_models=None if row["allowed_models"] is None else tuple(row["allowed_models"]),
        metadata=row["metadata"],
    )


def _usage(row: asyncpg.Record | None) -> UsageTotals:
    if row is None:
        return UsageTotals()
    return UsageTotals(
        requests=row["requests"],
        prompt_tokens=row["prompt_tokens"],
        completion_tokens=row["completion_tokens"],
        total_tokens=row["total_tokens"],
        errors=row["errors"],
        last_used_at=row["last_used_at"],
        cost_nanousd=row["cost_nanousd"],
    )


class PostgresStore:
    """Any number of instances share one database through it."""

    def __init__(self, pool: asyncpg.Pool, url: str, connect_timeout: float) -> None:
        self._pool = pool
        self._url = url  # as asyncpg reads it: without connect_timeout
        self._connect_timeout = connect_timeout
        self._releasing: set[asyncio.Future[Any]] = (
            set()
        )  # connections given back in the background

    @classmethod
    async def open(cls, url: str, *, pool_size: int = 10, migrate: bool = True) -> PostgresStore:
        try:
            url, seconds = split_connect_timeout(url)
            connect_timeout = float(seconds or _TIMEOUT)
            pool = await asyncpg.create_pool(
                url,
                min_size=1,
                max_size=pool_size,
                init=_prepare_connection,
                command_timeout=_TIMEOUT,
                timeout=connect_timeout,
                server_settings={"application_name": POOL_NAME},
            )
        except ValueError as exc:  # asyncpg reading the URL (its ClientConfigurationError too)
            raise UnreadableDatabaseUrl(without_credentials(str(exc), url)) from None
        store = cls(pool, url, connect_timeout)
        try:
            if migrate:
                await store.migrate()
        except BaseException:
            await pool.close()
            raise
        return store

    async def migrate(self) -> list[int]:
        """Apply the migrations this database lacks, in order; the versions applied."""
        async with self._pool.acquire(timeout=_TIMEOUT) as conn:
            return await apply_migrations(conn)

    async def close(self) -> None:
        try:
            async with asyncio.timeout(_TIMEOUT):
                await self._pool.close()
        except TimeoutError:
            self._pool.terminate()

    # Every query waits a bounded time for a pooled connection too (asyncpg's own pool shortcuts
    # would wait for ever when every connection is busy); the query itself is bounded by the
    # pool's command timeout.

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Conn]:
        """A pooled connection for one statement. One whose statement failed (timed out, say)
        waits to be given back until the database acknowledges the statement's cancellation,
        which a hung database never does: it is given back in the background then, so that the
        caller learns of the failure at once rather than after another timeout."""
        conn = await self._pool.acquire(timeout=_TIMEOUT)
        try:
            yield conn
        except BaseException:
            self._in_background(self._pool.release(conn))
            raise
        await self._pool.release(conn)

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Conn]:
        """A pooled connection in a transaction, committed when the block ends.

        A transaction the database refused (it answered with an error) is rolled back and its
        connection given back as usual. One that got no answer (a statement or the COMMIT timed
        out, the connection died) or whose caller stopped waiting is not rolled back: the ROLLBACK
        would first wait for the database to acknowledge the cancelled statement, which a hung
        database never does, so the caller would hear of the failure only after another timeout.
        Its connection is closed in the background instead (the cancellation still reaches a
        database that is merely slow, whose statement then stops), and never goes back to the
        pool in a state nobody knows. The database rolls back a transaction whose connection
        closed before its COMMIT arrived; a COMMIT that was sent stays in doubt for the caller
        to settle, as before."""
        conn = await self._pool.acquire(timeout=_TIMEOUT)
        transaction = conn.transaction()
        sound = False  # the connection is known to be idle, out of any transaction
        try:
            await transaction.start()
            try:
                yield conn
            except asyncpg.PostgresError:
                await transaction.rollback()
                sound = True
                raise
            try:
                await transaction.commit()
            except asyncpg.PostgresError:
                # Answered: the connection is idle (or closed by a FATAL error, which the pool
                # sees); whether it committed is for the caller, which knew it was committing.
                sound = True
                raise
            sound = True
        finally:
            if sound:
                await self._pool.release(conn)
            else:
                self._in_background(conn.close(timeout=_TIMEOUT))

    def _in_background(self, ending: Awaitable[Any]) -> None:
        """Give a failed statement's connection back, or close it, without its caller waiting:
        kept until done, its own failure retrieved (the caller was told of the first already)."""
        release = asyncio.ensure_future(ending)
        self._releasing.add(release)
        release.add_done_callback(self._released)

    def _released(self, release: asyncio.Future[Any]) -> None:
        self._releasing.discard(release)
        if not release.cancelled():
            release.exception()  # its statement's caller was told already

    async def _fetchrow(self, sql: str, *args: Any) -> Any:
        async with self._connection() as conn:
            return await conn.fetchrow(sql, *args)

    async def _fetchval(self, sql: str, *args: Any) -> Any:
        async with self._connection() as conn:
            return await conn.fetchval(sql, *args)

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        async with self._connection() as conn:
            return list(await conn.fetch(sql, *args))

    async def _execute(self, sql: str, *args: Any) -> str:
        async with self._connection() as conn:
            return str(await conn.execute(sql, *args))

    async def ping(self) -> None:
        await self._fetchval("SELECT 1")

    # -- helpers -------------------------------------------------------------------------------

    async def _audit(self, conn: Conn, entry: AuditEntry) -> None:
        await conn.execute(
            "INSERT INTO audit_events (timestamp, actor, action, target_type, target_id, project_id,"
            " outcome, details, request_id, client_ip) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10)",
            utcnow(),
            entry.actor,
            entry.action,
            entry.target_type,
            entry.target_id,
            entry.project_id,
            entry.outcome,
            entry.details,
            entry.request_id,
            entry.client_ip,
        )

    async def _changed(self, conn: Conn, project_id: str | None, token_id: str | None) -> None:
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _CHANGES_LOCK)
        change_id = await conn.fetchval(
            "INSERT INTO changes (project_id, token_id, at) VALUES ($1, $2, $3) RETURNING id",
            project_id,
            token_id,
            utcnow(),
        )
        await conn.execute("SELECT pg_notify($1, $2)", CHANGES_CHANNEL, str(change_id))

    # -- projects ------------------------------------------------------------------------------

    async def create_project(self, project: Project, audit: AuditEntry) -> Project:
        async with self._transaction() as conn:
            await conn.execute(
                "INSERT INTO projects (id, name, description, metadata, api_key_encrypted,"
                " api_key_masked, is_active, created_at, updated_at)"
                " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9)",
                project.id,
                project.name,
                project.description,
                project.metadata,
                project.api_key_encrypted,
                project.api_key_masked,
                project.is_active,
                project.created_at,
                project.updated_at,
            )
            await self._audit(conn, audit)
        return project

    async def get_project(self, project_id: str) -> Project | None:
        row = await self._fetchrow(
            f"SELECT {_PROJECT_READ_COLUMNS} FROM projects WHERE id = $1", project_id
        )
        return _project(row) if row else None

    async def list_projects(self) -> list[Project]:
        rows = await self._fetch(
            f"SELECT {_PROJECT_READ_COLUMNS} FROM projects ORDER BY created_at"
        )
        return [_project(r) for r in rows]

    async def update_project(
        self,
        project_id: str,
        changes: dict[str, Any],
        audit: AuditEntry,
        *,
        revoke_tokens: bool = False,
    ) -> Project | None:
        check_columns("project", changes, PROJECT_COLUMNS)
        columns = list(changes)
        assignments = "".join(f"{column} = ${n}, " for n, column in enumerate(columns, start=3))
        async with self._transaction() as conn:
            row = await conn.fetchrow(
                f"UPDATE projects SET {assignments}updated_at = $2 WHERE id = $1"
                f" RETURNING {_PROJECT_READ_COLUMNS}",
                project_id,
                utcnow(),
                *(changes[c] for c in columns),
            )
            if row is None:
                return None
            if revoke_tokens:
                audit = with_revoke_counts(audit, await _revoke_tokens_of(conn, project_id))
            await self._changed(conn, project_id, None)
            await self._audit(conn, audit)
        return _project(row)

    async def delete_project(self, project_id: str, audit: AuditEntry) -> bool:
        async with self._transaction() as conn:
            status = await conn.execute("DELETE FROM projects WHERE id = $1", project_id)
            if status == "DELETE 0":
                return False
            await self._changed(conn, project_id, None)
            await self._audit(conn, audit)
        return True

    async def revoke_project_tokens(
        self, project_id: str, audit: AuditEntry | None
    ) -> RevokeCounts:
        async with self._transaction() as conn:
            counts = await _revoke_tokens_of(conn, project_id)
            await self._changed(conn, project_id, None)
            if audit is not None:
                await self._audit(conn, with_revoke_counts(audit, counts))
        return counts

    # -- tokens --------------------------------------------------------------------------------

    async def create_token(self, token: Token, token_hash: str, audit: AuditEntry) -> Token:
        async with self._transaction() as conn:
            await conn.execute(
                "INSERT INTO tokens (id, project_id, token_hash, expires_at, is_active,"
                " request_count, max_requests, created_at, rpm, tpm, budget_nanousd,"
                " allowed_models, metadata) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13)",
                token.id,
                token.project_id,
                token_hash,
                token.expires_at,
                token.is_active,
                token.request_count,
                token.max_requests,
                token.created_at,
                token.rpm,
                token.tpm,
                token.budget_nanousd,
                None if token.allowed_models is None else list(token.allowed_models),
                token.metadata,
            )
            await self._audit(conn, audit)
        return token

    async def get_token(self, token_id: str) -> Token | None:
        row = await self._fetchrow(
            f"SELECT {_TOKEN_READ_COLUMNS} FROM tokens WHERE id = $1", token_id
        )
        return _token(row) if row else None

    async def list_tokens(self, project_id: str | None = None) -> list[Token]:
        if project_id is None:
            rows = await self._fetch(
                f"SELECT {_TOKEN_READ_COLUMNS} FROM tokens ORDER BY created_at"
            )
        else:
            rows = await self._fetch(
                f"SELECT {_TOKEN_READ_COLUMNS} FROM tokens WHERE project_id = $1 ORDER BY created_at",
                project_id,
            )
        return [_token(r) for r in rows]

    async def find_token_id_by_hash(self, token_hash: str) -> str | None:
        value = await self._fetchval("SELECT id FROM tokens WHERE token_hash = $1", token_hash)
        return str(value) if value is not None else None

    async def grant_for_hash(self, token_hash: str) -> TokenGrant | None:
        row = await self._fetchrow(
            f"SELECT {_GRANT_READ_COLUMNS}, p.is_active AS project_is_active, p.api_key_encrypted"
            " FROM tokens t JOIN projects p ON p.id = t.project_id WHERE t.token_hash = $1",
            token_hash,
        )
        if row is None:
            return None
        return TokenGrant(_token(row), row["project_is_active"], row["api_key_encrypted"])

    async def update_token(
        self, token_id: str, changes: dict[str, Any], audit: AuditEntry
    ) -> Token | None:
        check_columns("token", changes, TOKEN_COLUMNS)
        columns = list(changes)
        async with self._transaction() as conn:
            if columns:
                assignments = ", ".join(f"{c} = ${n}" for n, c in enumerate(columns, start=2))
                row = await conn.fetchrow(
                    f"UPDATE tokens SET {assignments} WHERE id = $1 RETURNING {_TOKEN_READ_COLUMNS}",
                    token_id,
                    *(changes[c] for c in columns),
                )
            else:
                row = await conn.fetchrow(
                    f"SELECT {_TOKEN_READ_COLUMNS} FROM tokens WHERE id = $1", token_id
                )
            if row is None:
                return None
            token = _token(row)
            await self._changed(conn, token.project_id, token_id)
            await self._audit(conn, audit)
        return token

    # -- accounting ----------------------------------------------------------------------------

    async def consume_request(self, token_id: str, at: datetime) -> Claim | None:
        # In a transaction of its own, not one statement: a statement whose answer is lost may
        # have counted the request or not, and nothing could tell which; a transaction that
        # answered its UPDATE has a known id, whose fate the database tells after a lost COMMIT.
        claimed = None
        try:
            async with self._transaction() as conn:
                claimed = await conn.fetchrow(
                    "UPDATE tokens SET request_count = request_count + 1, last_used_at = $2"
                    " WHERE id = $1 AND is_active"
                    " AND (max_requests IS NULL OR request_count < max_requests)"
                    " RETURNING request_count, max_requests, txid_current() AS txid",
                    token_id,
                    at,
                )
        except Exception as exc:
            if claimed is not None:
                committed = partial(self._committed, claimed["txid"])
                raise ClaimInDoubt(committed, _claim(claimed)) from exc
            raise  # nothing counted: the database rolled it back
        return None if claimed is None else _claim(claimed)

    async def release_request(self, token_id: str) -> None:
        # A transaction whose id comes back with its UPDATE, as consume_request: given back twice,
        # a place would be a request the quota never counted.
        released = None
        try:
            async with self._transaction() as conn:
                released = await conn.fetchval(
                    "UPDATE tokens SET request_count = request_count - 1"
                    " WHERE id = $1 AND request_count > 0 RETURNING txid_current()",
                    token_id,
                )
        except Exception as exc:
            if released is not None:
                raise CommitInDoubt(partial(self._committed, released)) from exc
            raise  # nothing given back: the database rolled it back

    async def take_rate_slot(self, token_id: str) -> RateSlot:
        # One conditional UPDATE of the token's row: PostgreSQL locks the row and re-checks the
        # condition on its latest version, so concurrent instances cannot both take the last slot.
        # The clock is the database's, so instances on machines whose clocks differ agree.
        for _ in range(_RATE_ATTEMPTS):
            row = await self._fetchrow(_TAKE_RATE_SLOT, token_id, RATE_WINDOW_MICROS)
            if row is None:
                return RateSlot(True)  # no such token, or no rpm: nothing to count
            if row["taken"] is not None:
                return RateSlot(True, at_micros=row["taken"])
            if row["retry_after_micros"] is not None:
                return RateSlot(False, retry_after=row["retry_after_micros"] / 1e6)
            # Refused on a newer version of the row than the statement's snapshot showed (a
            # concurrent request took the last slot): ask again to learn when a slot frees.
        return RateSlot(False, retry_after=1.0)

    async def give_back_rate_slot(self, token_id: str, at_micros: int) -> None:
        await self._execute(
            "UPDATE tokens SET rpm_log = array_remove(rpm_log, $2) WHERE id = $1",
            token_id,
            at_micros,
        )

    async def tpm_room(self, token_id: str, mark_bound: int = 0, upto: int = 0) -> RateSlot:
        row = await self._fetchrow(
            "SELECT tpm, tpm_log, tpm_marks,"
            " (extract(epoch FROM clock_timestamp()) * 1000000)::BIGINT AS now"
            " FROM tokens WHERE id = $1",
            token_id,
        )
        if row is None or row["tpm"] is None:
            return RateSlot(True)
        log = [(at, tokens) for at, tokens in row["tpm_log"]]
        room = tpm_room(log, row["now"], row["tpm"])
        return with_marks(room, row["tpm_marks"].values(), row["now"], mark_bound, upto)

    async def mark_answered(self, token_id: str, mark: str, bound: int) -> None:
        # One statement: the row's marks younger than the bound, and this one.
        await self._execute(
            "WITH now AS (SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::BIGINT AS at)"
            " UPDATE tokens SET tpm_marks = COALESCE("
            "   (SELECT jsonb_object_agg(m.key, m.value) FROM jsonb_each(tpm_marks) m"
            "    WHERE m.value::BIGINT > now.at - $3), '{}'::jsonb"
            " ) || jsonb_build_object($2::TEXT, now.at)"
            " FROM now WHERE id = $1",
            token_id,
            mark,
            bound,
        )

    async def forget_mark(self, token_id: str, mark: str) -> None:
        await self._execute(
            "UPDATE tokens SET tpm_marks = tpm_marks - $2::TEXT WHERE id = $1", token_id, mark
        )

    async def record_tokens(self, token_id: str, tokens: int, mark: str = "") -> None:
        # One statement: the row's own log, pruned to the window, with this request appended,
        # and its answer's mark removed.
        await self._execute(
            "WITH now AS (SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::BIGINT AS at)"
            " UPDATE tokens SET tpm_log = COALESCE("
            "   (SELECT jsonb_agg(e ORDER BY (e->>0)::BIGINT) FROM jsonb_array_elements(tpm_log) e"
            "    WHERE (e->>0)::BIGINT > now.at - $3), '[]'::jsonb"
            " ) || jsonb_build_array(jsonb_build_array(now.at, $2::BIGINT)),"
            " tpm_marks = tpm_marks - $4::TEXT"
            " FROM now WHERE id = $1",
            token_id,
            tokens,
            RATE_WINDOW_MICROS,
            mark,
        )

    async def reserve_budget(
        self,
        token_id: str,
        hold_id: str,
        want_nanousd: int,
        minimum_nanousd: int,
        hold_seconds: float,
    ) -> BudgetHold:
        # The token's row is locked for the transaction, so the room read is the room written:
        # concurrent reservations on every instance queue on the row and never hold more than
        # the budget. A token without a budget is neither locked nor written.
        async with self._transaction() as conn:
            row = await conn.fetchrow(
                "SELECT budget_nanousd, spent_nanousd, reserved_nanousd FROM tokens"
                " WHERE id = $1 AND budget_nanousd IS NOT NULL FOR UPDATE",
                token_id,
            )
            if row is None:
                return BudgetHold(True, 0, 0)
            budget, spent = row["budget_nanousd"], row["spent_nanousd"]
            room = budget - spent - row["reserved_nanousd"]
            if room < minimum_nanousd:
                exhausted = budget_spent(budget, spent, minimum_nanousd)
                return BudgetHold(False, 0, max(room, 0), exhausted=exhausted)
            amount = min(want_nanousd, room)
            await conn.execute(
                _TAKE_BUDGET_HOLD, hold_id, token_id, amount, round(hold_seconds * 1e6)
            )
        return BudgetHold(True, amount, room - amount)

    async def note_budget_refused(
        self, token_id: str, budget_nanousd: int, minimum_nanousd: int
    ) -> None:
        await self._execute(
            "UPDATE tokens SET budget_refused_nanousd = LEAST(budget_refused_nanousd, $3)"
            " WHERE id = $1 AND budget_nanousd = $2",
            token_id,
            budget_nanousd,
            minimum_nanousd,
        )

    async def settle_budget(self, token_id: str, hold_id: str, cost_nanousd: int) -> None:
        await self._execute(_SETTLE_BUDGET, token_id, hold_id, cost_nanousd)

    async def settle_budgets(self, settlements: Sequence[tuple[str, str, int]]) -> None:
        if not settlements:
            return
        # Spend added twice is spend made up. In the same order in every instance: two batches
        # locking the same tokens' rows in opposite orders would deadlock.
        await self._executemany_once(_SETTLE_BUDGET, sorted(settlements))

    async def _executemany_once(self, sql: str, args: Sequence[tuple[Any, ...]]) -> None:
        """``sql`` for each of ``args`` in one transaction, for writes that add: one whose COMMIT
        went unanswered is not simply sent again (it would add twice) but raises
        :class:`CommitInDoubt`, whose caller asks the transaction's fate first."""
        committing = False
        try:
            async with self._transaction() as conn:
                txid = await conn.fetchval("SELECT txid_current()")
                await conn.executemany(sql, args)
                committing = True
        except Exception as exc:
            if committing:
                raise CommitInDoubt(partial(self._committed, txid)) from exc
            raise  # before COMMIT: the database rolled it back

    async def _committed(self, txid: int) -> bool:
        status = await self._fetchval("SELECT txid_status($1)", txid)
        if status not in ("committed", "aborted"):
            raise FateUnknown(f"transaction {txid} is {status or 'unknown'}")
        return bool(status == "committed")

    async def renew_budget_holds(self, hold_ids: Sequence[str], hold_seconds: float) -> None:
        if not hold_ids:
            return
        await self._execute(_RENEW_BUDGET_HOLDS, list(hold_ids), round(hold_seconds * 1e6))

    async def reclaim_budget_holds(self) -> int:
        async with self._transaction() as conn:
            # One reclaimer at a time: two deleting the same holds in different orders could
            # deadlock, and the second would find nothing left anyway.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _RECLAIM_LOCK)
            return int(await conn.fetchval(_RECLAIM_BUDGET_HOLDS))

    async def add_usage(self, deltas: Sequence[UsageDelta]) -> None:
        if not deltas:
            return
        # To its end whatever happens to the caller, as every SQLite write: the tallies are out of
        # memory once handed over, and a flush cancelled by the stop would roll them back, lost.
        # (Requests counted twice are quota taken from the token: written once.)
        await asyncio.shield(
            self._executemany_once(
                "UPDATE tokens SET request_count = request_count + $2,"
                " last_used_at = GREATEST(last_used_at, $3) WHERE id = $1",
                [(d.token_id, d.requests, d.last_used_at) for d in deltas],
            )
        )

    # -- usage aggregates ----------------------------------------------------------------------

    async def add_usage_rollup(self, rows: Sequence[UsageRollup]) -> None:
        if not rows:
            return
        # Usage added twice is usage made up.
        await self._executemany_once(
            "INSERT INTO usage_hourly AS u (token_id, project_id, hour, requests,"
            " prompt_tokens, completion_tokens, total_tokens, errors, last_used_at,"
            " cost_nanousd)"
            " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10)"
            " ON CONFLICT (token_id, hour) DO UPDATE SET"
            " requests = u.requests + excluded.requests,"
            " prompt_tokens = u.prompt_tokens + excluded.prompt_tokens,"
            " completion_tokens = u.completion_tokens + excluded.completion_tokens,"
            " total_tokens = u.total_tokens + excluded.total_tokens,"
            " errors = u.errors + excluded.errors,"
            " cost_nanousd = u.cost_nanousd + excluded.cost_nanousd,"
            " last_used_at = GREATEST(u.last_used_at, excluded.last_used_at)",
            [
                (
                    r.token_id,
                    r.project_id,
                    hour_start(r.hour),
                    r.requests,
                    r.prompt_tokens,
                    r.completion_tokens,
                    r.total_tokens,
                    r.errors,
                    r.last_used_at,
                    r.cost_nanousd,
                )
                for r in rows
            ],
        )

    async def token_usage(self, token_id: str) -> UsageTotals:
        return _usage(
            await self._fetchrow(
                f"SELECT {_USAGE_SUMS} FROM usage_hourly WHERE token_id = $1", token_id
            )
        )

    async def project_usage(self, project_id: str) -> UsageTotals:
        return _usage(
            await self._fetchrow(
                f"SELECT {_USAGE_SUMS} FROM usage_hourly WHERE project_id = $1", project_id
            )
        )

    async def project_token_usage(self, project_id: str) -> dict[str, UsageTotals]:
        rows = await self._fetch(
            f"SELECT token_id, {_USAGE_SUMS} FROM usage_hourly WHERE project_id = $1"
            " GROUP BY token_id",
            project_id,
        )
        return {row["token_id"]: _usage(row) for row in rows}

    async def usage_since(self, since: datetime) -> UsageTotals:
        return _usage(
            await self._fetchrow(
                f"SELECT {_USAGE_SUMS} FROM usage_hourly WHERE hour >= $1", hour_start(since)
            )
        )

    async def usage_by_hour(
        self, since: datetime, *, project_id: str | None = None, token_id: str | None = None
    ) -> list[tuple[datetime, UsageTotals]]:
        where: list[str] = ["hour >= $1"]
        params: list[Any] = [hour_start(since)]
        for column, value in (("project_id", project_id), ("token_id", token_id)):
            if value is not None:
                params.append(value)
                where.append(f"{column} = ${len(params)}")
        rows = await self._fetch(
            f"SELECT hour, {_USAGE_SUMS} FROM usage_hourly WHERE {' AND '.join(where)}"
            " GROUP BY hour ORDER BY hour",
            *params,
        )
        return [(row["hour"], _usage(row)) for row in rows]

    async def prune_usage_hourly(self, before: datetime) -> int:
        status = await self._execute("DELETE FROM usage_hourly WHERE hour < $1", hour_start(before))
        return int(status.rsplit(" ", 1)[-1])  # "DELETE <count>"

    async def prune_audit(self, before: datetime, at_most: int) -> int:
        status = await self._execute(
            "DELETE FROM audit_events WHERE id IN"
            " (SELECT id FROM audit_events WHERE timestamp < $1 ORDER BY timestamp, id LIMIT $2)",
            before,
            at_most,
        )
        return int(status.rsplit(" ", 1)[-1])  # "DELETE <count>"

    async def prune_expired_tokens(self, before: datetime, at_most: int) -> int:
        status = await self._execute(
            "DELETE FROM tokens WHERE id IN"
            " (SELECT id FROM tokens WHERE expires_at < $1 ORDER BY expires_at LIMIT $2)",
            before,
            at_most,
        )
        return int(status.rsplit(" ", 1)[-1])  # "DELETE <count>"

    # -- change feed ---------------------------------------------------------------------------

    async def latest_change(self) -> int:
        return int(await self._fetchval("SELECT COALESCE(MAX(id), 0) FROM changes"))

    async def changes_since(self, cursor: int) -> tuple[int, list[tuple[str | None, str | None]]]:
        rows = await self._fetch(_CHANGES_SINCE, cursor)
        if not rows:
            return cursor, []
        return rows[-1]["id"], [(r["project_id"], r["token_id"]) for r in rows]

    async def prune_changes(self, before: datetime, at_most: int) -> int:
        status = await self._execute(_PRUNE_CHANGES, before, at_most)
        return int(status.rsplit(" ", 1)[-1])  # "DELETE <count>"

    async def listen_changes(self, wake: Callable[[], None], connected: Callable[[], None]) -> None:
        """Call ``wake`` for every change committed by any instance, until the connection is lost.

        Runs on a connection of its own (a pooled one could not keep listening). Raises
        ``ConnectionError`` when the connection ends; cancelling it closes the connection.
        """
        conn = await asyncpg.connect(
            self._url,
            timeout=self._connect_timeout,
            server_settings={"application_name": LISTENER_NAME},
        )
        lost = asyncio.get_running_loop().create_future()

        def on_notify(*_: object) -> None:
            wake()

        def on_terminated(_: object) -> None:
            if not lost.done():
                lost.set_result(None)

        try:
            conn.add_termination_listener(on_terminated)
            await conn.add_listener(CHANGES_CHANNEL, on_notify)
            connected()
            await _until_lost(conn, lost)
        finally:
            conn.terminate()
        raise ConnectionError("the change feed's LISTEN connection was lost")

    # -- issue forms ---------------------------------------------------------------------------

    async def claim_issue_form(self, form_id: str, remember_seconds: float) -> bool:
        async with self._connection() as conn:
            # Rows another claim is deleting are skipped, not waited for (nor deadlocked on).
            await conn.execute(
                "DELETE FROM issue_forms WHERE form_id IN (SELECT form_id FROM issue_forms"
                f" WHERE claimed_at < {_NOW_MICROS} - $1 ORDER BY claimed_at LIMIT $2"
                " FOR UPDATE SKIP LOCKED)",
                round(remember_seconds * 1e6),
                FORGET_ISSUE_FORMS_AT_ONCE,
            )
            # The primary key decides: of concurrent inserts of one id, exactly one gets its row.
            claimed = await conn.fetchval(
                f"INSERT INTO issue_forms (form_id, claimed_at) VALUES ($1, {_NOW_MICROS})"
                " ON CONFLICT (form_id) DO NOTHING RETURNING form_id",
                form_id,
            )
        return claimed is not None

    async def release_issue_form(self, form_id: str) -> None:
        await self._execute(
            "DELETE FROM issue_forms WHERE form_id = $1 AND token_id IS NULL", form_id
        )

    async def record_issue_form(self, form_id: str, token_id: str) -> None:
        await self._execute(
            "INSERT INTO issue_forms (form_id, token_id, claimed_at)"
            f" VALUES ($1, $2, {_NOW_MICROS})"
            " ON CONFLICT (form_id) DO UPDATE SET token_id = excluded.token_id",
            form_id,
            token_id,
        )

    async def issue_form(self, form_id: str) -> IssueForm | None:
        row = await self._fetchrow(
            "SELECT token_id, shown FROM issue_forms WHERE form_id = $1", form_id
        )
        return None if row is None else IssueForm(row["token_id"], row["shown"])

    async def show_issue_form(self, form_id: str, token_id: str) -> bool:
        # A concurrent marking waits for the row's lock and re-checks ``NOT shown`` on the version
        # the first one committed, so exactly one statement returns the row.
        marked = await self._fetchval(
            "INSERT INTO issue_forms AS f (form_id, token_id, claimed_at, shown)"
            f" VALUES ($1, $2, {_NOW_MICROS}, TRUE)"
            " ON CONFLICT (form_id) DO UPDATE SET shown = TRUE WHERE NOT f.shown"
            " RETURNING f.form_id",
            form_id,
            token_id,
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
                params.append(value)
                clauses.append(f"{column} = ${len(params)}")
        if filters.since is not None:
            params.append(filters.since)
            clauses.append(f"timestamp >= ${len(params)}")
        if filters.until is not None:
            params.append(filters.until)
            clauses.append(f"timestamp < ${len(params)}")
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        total = await self._fetchval(f"SELECT COUNT(*) FROM audit_events{where}", *params)
        n = len(params)
        rows = await self._fetch(
            f"SELECT {_AUDIT_READ_COLUMNS} FROM audit_events{where} ORDER BY id DESC LIMIT ${n + 1} OFFSET ${n + 2}",
            *params,
            page_size,
            (page - 1) * page_size,
        )
        events = [
            AuditEvent(
                id=r["id"],
                timestamp=r["timestamp"],
                entry=AuditEntry(
                    actor=r["actor"],
                    action=r["action"],
                    target_type=r["target_type"],
                    target_id=r["target_id"],
                    project_id=r["project_id"],
                    details=r["details"],
                    request_id=r["request_id"],
                    client_ip=r["client_ip"],
                    outcome=r["outcome"],
                ),
            )
            for r in rows
        ]
        return events, int(total)


async def _until_lost(conn: asyncpg.Connection, lost: asyncio.Future[None]) -> None:
    """Wait until the connection ends, checking it now and then: a server that vanished without
    closing the socket (a killed host, a dropped network) sends no termination."""
    while True:
        try:
            async with asyncio.timeout(_TIMEOUT):
                await asyncio.shield(lost)
            return
        except TimeoutError:
            pass
        try:
            await conn.fetchval("SELECT 1", timeout=_TIMEOUT)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
            return


def _claim(row: Any) -> Claim:
    return Claim(int(row["request_count"]), row["max_requests"])


async def _revoke_tokens_of(conn: Conn, project_id: str) -> RevokeCounts:
    """Revoke a project's tokens inside the caller's transaction; what it counted."""
    # The rows locked as they are read: none can change state between the count and the UPDATE
    # (a revocation committed meanwhile was counted by neither), and a token issued meanwhile is
    # revoked and counted by the UPDATE, so the counts add up.
    inactive = await conn.fetchval(
        "SELECT COUNT(*) FILTER (WHERE NOT is_active) FROM"
        " (SELECT is_active FROM tokens WHERE project_id = $1 FOR UPDATE) AS held",
        project_id,
    )
    status = await conn.execute(
        "UPDATE tokens SET is_active = FALSE, revoked_at = $2 WHERE project_id = $1 AND is_active",
        project_id,
        utcnow(),
    )
    revoked = int(status.split()[-1])
    return RevokeCounts(revoked, int(inactive), revoked + int(inactive))
