"""Admission of withering tokens on the request path.

A token validated recently is checked from memory: one SHA-256 and one dict lookup. The database is
touched only on a cache miss, and for tokens that carry ``max_requests``, whose count must be exact
across every process and instance and is therefore claimed with one conditional ``UPDATE``. Requests
of unlimited tokens are tallied in memory and written in batches by :meth:`flush_usage`.

Staleness: a management change made in this process evicts the affected entries at once
(:meth:`invalidate`); changes made elsewhere arrive through the store's change feed, polled by
:meth:`poll_changes` several times a second, so every process follows within a second.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog

from llm_proxy import errors
from llm_proxy.crypto import KeyCipher, hash_token, is_token_shaped
from llm_proxy.models import UsageDelta
from llm_proxy.stats import STATS
from llm_proxy.store import Store

log = structlog.get_logger(__name__)

_NEGATIVE_TTL = 5.0
_NEGATIVE_MAX = 10_000


@dataclass(slots=True, eq=False)
class Grant:
    """What the proxy path needs to admit and forward a request for one token."""

    digest: str  # SHA-256 of the token value: the cache key
    token_id: str
    project_id: str
    expires_at: float  # epoch seconds
    is_active: bool
    project_is_active: bool
    max_requests: int | None
    upstream_authorization: str  # "Bearer <project key>"; never logged
    loaded_at: float  # monotonic
    exhausted: bool = False

    def __repr__(self) -> str:
        return f"Grant(token_id={self.token_id!r}, project_id={self.project_id!r})"


class TokenAuthority:
    def __init__(self, store: Store, cipher: KeyCipher, *, cache_seconds: float) -> None:
        self._store = store
        self._cipher = cipher
        self._cache_seconds = cache_seconds
        self._by_hash: dict[str, Grant] = {}
        self._unknown: dict[str, float] = {}
        self._loading: dict[str, asyncio.Future[Grant | None]] = {}
        self._pending: dict[str, list[float]] = {}  # token_id → [requests, last_used epoch]
        self._change_cursor = 0

    async def start(self) -> None:
        self._change_cursor = await self._store.latest_change()

    # -- the request path ----------------------------------------------------------------------

    async def admit(self, authorization: str | None) -> Grant:
        """Check a bearer credential and count the request, or raise the error it is refused with."""
        grant = await self.check(authorization)
        wall = time.time()
        if grant.max_requests is None:
            tally = self._pending.get(grant.token_id)
            if tally is None:
                self._pending[grant.token_id] = [1, wall]
            else:
                tally[0] += 1
                tally[1] = wall
            return grant
        if grant.exhausted or not await self._claim(grant.token_id, wall):
            return await self._refused_quota(grant)
        return grant

    async def release(self, grant: Grant) -> None:
        """Take back the request :meth:`admit` counted, when it never reached the upstream."""
        if grant.max_requests is None:
            # The tally may have been written already: a negative one takes the request back.
            self._pending.setdefault(grant.token_id, [0, time.time()])[0] -= 1
            return
        try:
            await self._store.release_request(grant.token_id)
        except Exception as exc:
            # The request stays counted: a lost refund errs on the side of the quota.
            log.error("token_authority.store_failed", operation="release", error=str(exc))
            return
        grant.exhausted = False

    async def check(self, authorization: str | None) -> Grant:
        """Validate a bearer credential without counting a request."""
        if not authorization or authorization[:7].lower() != "bearer ":
            raise errors.InvalidToken("Missing bearer token in the Authorization header.")
        value = authorization[7:].strip()
        if not is_token_shaped(value):
            raise errors.InvalidToken("The bearer token is not a withering token.")
        digest = hash_token(value)
        grant = self._by_hash.get(digest)
        now = time.monotonic()
        if grant is None or now - grant.loaded_at > self._cache_seconds:
            STATS.cache_misses += 1
            grant = await self._load(digest, now)
        else:
            STATS.cache_hits += 1
        if not grant.is_active:
            raise errors.TokenInactive("This token has been revoked.")
        if time.time() >= grant.expires_at:
            raise errors.TokenExpired("This token has expired.")
        if not grant.project_is_active:
            raise errors.ProjectInactive("The project of this token is inactive.")
        return grant

    async def _claim(self, token_id: str, wall: float) -> bool:
        try:
            return await self._store.consume_request(token_id, datetime.fromtimestamp(wall, UTC))
        except Exception as exc:
            log.error("token_authority.store_failed", operation="consume", error=str(exc))
            raise errors.ServiceUnavailable(
                "The token store is unavailable; retry shortly."
            ) from None

    async def _refused_quota(self, grant: Grant) -> Grant:
        # The claim failed: either the quota is used up, or another process revoked the token a
        # moment ago. Reload to tell which, so the client gets the right code.
        fresh = await self._load(grant.digest, time.monotonic())
        if not fresh.is_active:
            raise errors.TokenInactive("This token has been revoked.")
        fresh.exhausted = True
        raise errors.QuotaExceeded(
            f"This token has used all {grant.max_requests} of its requests.",
        )

    async def _load(self, digest: str, now: float) -> Grant:
        if self._unknown.get(digest, 0.0) > now:
            raise errors.TokenNotFound("Unknown token.")
        pending = self._loading.get(digest)
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            self._loading[digest] = pending
            try:
                pending.set_result(await self._fetch(digest, now))
            except BaseException as exc:
                pending.set_exception(exc)
                # Nobody else may be waiting; mark the exception retrieved to keep asyncio quiet.
                pending.exception()
                raise
            finally:
                del self._loading[digest]
        grant = await asyncio.shield(pending)
        if grant is None:
            raise errors.TokenNotFound("Unknown token.")
        return grant

    async def _fetch(self, digest: str, now: float) -> Grant | None:
        try:
            row = await self._store.grant_for_hash(digest)
        except Exception as exc:
            log.error("token_authority.store_failed", operation="lookup", error=str(exc))
            raise errors.ServiceUnavailable(
                "The token store is unavailable; retry shortly."
            ) from None
        if row is None:
            if len(self._unknown) >= _NEGATIVE_MAX:
                self._unknown.clear()
            self._unknown[digest] = now + _NEGATIVE_TTL
            self._by_hash.pop(digest, None)
            return None
        token = row.token
        grant = Grant(
            digest=digest,
            token_id=token.id,
            project_id=token.project_id,
            expires_at=token.expires_at.timestamp(),
            is_active=token.is_active,
            project_is_active=row.project_is_active,
            max_requests=token.max_requests,
            upstream_authorization="Bearer " + self._cipher.decrypt(row.api_key_encrypted),
            loaded_at=now,
            exhausted=token.max_requests is not None and token.request_count >= token.max_requests,
        )
        self._by_hash[digest] = grant
        return grant

    # -- off the request path ------------------------------------------------------------------

    def invalidate(self, *, project_id: str | None = None, token_id: str | None = None) -> None:
        """Forget cached grants of a token or of a whole project; the next request reloads."""
        stale = [
            digest
            for digest, grant in self._by_hash.items()
            if (token_id is not None and grant.token_id == token_id)
            or (project_id is not None and grant.project_id == project_id)
        ]
        for digest in stale:
            del self._by_hash[digest]

    async def poll_changes(self) -> int:
        """Evict what other processes changed since the last poll; returns how many changes."""
        cursor, changes = await self._store.changes_since(self._change_cursor)
        self._change_cursor = cursor
        for project_id, token_id in changes:
            if token_id is not None:
                self.invalidate(token_id=token_id)
            elif project_id is not None:
                self.invalidate(project_id=project_id)
        return len(changes)

    async def flush_usage(self) -> int:
        """Write the in-memory request tallies; returns how many tokens were written."""
        if not self._pending:
            return 0
        pending, self._pending = self._pending, {}
        deltas = [
            UsageDelta(token_id, int(count), datetime.fromtimestamp(last, UTC))
            for token_id, (count, last) in pending.items()
        ]
        try:
            await self._store.add_usage(deltas)
        except Exception:
            # Keep the counts for the next attempt rather than lose them.
            for token_id, (count, last) in pending.items():
                tally = self._pending.setdefault(token_id, [0, last])
                tally[0] += count
                tally[1] = max(tally[1], last)
            raise
        return len(deltas)

    async def run_background(self, poll_seconds: float, flush_seconds: float) -> None:
        """Poll the change feed and flush usage until cancelled; errors are logged, never fatal."""
        next_flush = time.monotonic() + flush_seconds
        while True:
            await asyncio.sleep(poll_seconds)
            try:
                await self.poll_changes()
                if time.monotonic() >= next_flush:
                    next_flush = time.monotonic() + flush_seconds
                    await self.flush_usage()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("token_authority.background_failed")
