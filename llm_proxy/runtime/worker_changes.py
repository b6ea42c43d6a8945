"""Management changes told to the sibling workers of ``llm-proxy server --workers N`` at once.

A management call lands on one worker (the port is shared), which evicts what it changed from its
own token cache; its siblings would learn it only at their next read of the change feed, so a
request right after the answer, on a new connection, could reach a sibling that still trusts its
cache. So before the call is answered, the worker that made the change tells each sibling which
project or token changed, on that sibling's private unix socket
(``DATA_DIR/run/changes-worker-<n>.sock``, beside the metrics sockets: directory 0700, socket
0600), and waits until each has evicted it, for at most :data:`TELL_SECONDS`. A sibling that
does not confirm in time (stalled, or dead and not yet replaced) is logged and still has the
change feed, as every other instance does.

The message is one line, ``[project_id, token_id]`` in JSON (either may be null; both null: every
cached token), answered ``ok``. Nothing here is on the request path.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

import orjson
import structlog

from llm_proxy.runtime.worker_metrics import private_listener
from llm_proxy.stats import STATS

log = structlog.get_logger(__name__)

# What a worker does with a sibling's change: evict the project's or the token's cached grants.
Evict = Callable[[str | None, str | None], None]

TELL_SECONDS = 0.5
_CONFIRMED = b"ok\n"
# A message names two ids; anything longer is not one.
_MAX_MESSAGE = 4096


def socket_path(data_dir: Path, index: int) -> Path:
    # As long as the metrics socket's name, whose length prepare_sockets checks.
    return data_dir / "run" / f"changes-worker-{index}.sock"


def _ids(line: bytes) -> tuple[str | None, str | None]:
    ids = orjson.loads(line)
    if not (
        isinstance(ids, list)
        and len(ids) == 2
        and all(value is None or isinstance(value, str) for value in ids)
    ):
        raise ValueError("not [project_id, token_id]")
    return ids[0], ids[1]


class WorkerChanges:
    """This worker's socket for its siblings' changes, and the telling of its own to them."""

    def __init__(self, data_dir: Path, index: int, count: int) -> None:
        self._data_dir = data_dir
        self._index = index
        self._count = count
        self._evict: Evict | None = None
        self._server: asyncio.AbstractServer | None = None

    async def serve(self, evict: Evict) -> None:
        """Listen on this worker's socket, replacing a stale one from an earlier run.

        A worker that cannot listen still serves requests, following the change feed alone.
        """
        self._evict = evict
        path = socket_path(self._data_dir, self._index)
        try:
            sock = private_listener(path)
        except OSError as exc:
            log.error("server.worker_changes_unavailable", path=str(path), error=exc.strerror)
            return
        try:
            self._server = await asyncio.start_unix_server(
                self._received, sock=sock, limit=_MAX_MESSAGE
            )
        except BaseException:
            sock.close()
            raise

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
            socket_path(self._data_dir, self._index).unlink(missing_ok=True)

    async def _received(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(TELL_SECONDS):
                project_id, token_id = _ids(await reader.readuntil(b"\n"))
            if self._evict is not None:
                self._evict(project_id, token_id)
            writer.write(_CONFIRMED)
            await writer.drain()
        except (
            OSError,
            TimeoutError,
            ValueError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,  # a line longer than any message
        ) as exc:
            log.warning("server.worker_change_unread", error=type(exc).__name__)
        finally:
            writer.close()

    async def tell(self, project_id: str | None, token_id: str | None) -> None:
        """Have every sibling evict what this change made stale; returns once each confirmed, or
        after :data:`TELL_SECONDS` (the change feed brings it to those that did not)."""
        message = orjson.dumps([project_id, token_id]) + b"\n"
        siblings = [n for n in range(self._count) if n != self._index]
        await asyncio.gather(*(self._tell_one(n, message) for n in siblings))

    async def _tell_one(self, index: int, message: bytes) -> None:
        path = socket_path(self._data_dir, index)
        try:
            async with asyncio.timeout(TELL_SECONDS):
                reader, writer = await asyncio.open_unix_connection(os.fsdecode(path))
                try:
                    writer.write(message)
                    answer = await reader.readexactly(len(_CONFIRMED))
                finally:
                    writer.close()
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            STATS.worker_changes_unconfirmed += 1
            log.warning("server.worker_change_unconfirmed", worker=index, error=type(exc).__name__)
            return
        if answer != _CONFIRMED:
            STATS.worker_changes_unconfirmed += 1
            log.warning("server.worker_change_unconfirmed", worker=index, error="bad answer")
