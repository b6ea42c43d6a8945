"""Management changes told to sibling workers over their private unix sockets: evicted before the
telling returns, and a sibling that does not answer holds the telling for a bounded time only."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import time
from pathlib import Path

from llm_proxy.runtime.worker_changes import TELL_SECONDS, WorkerChanges, socket_path
from llm_proxy.runtime.worker_metrics import prepare_sockets
from llm_proxy.stats import STATS


async def test_every_sibling_evicts_the_change_before_the_telling_returns(
    tmp_path: Path,
) -> None:
    prepare_sockets(tmp_path, 3)
    evicted: list[list[tuple[str | None, str | None]]] = [[], [], []]
    workers = [WorkerChanges(tmp_path, n, 3) for n in range(3)]
    for n, worker in enumerate(workers):
        await worker.serve(
            lambda project_id, token_id, n=n: evicted[n].append((project_id, token_id))
        )
    try:
        assert stat.S_IMODE(socket_path(tmp_path, 1).stat().st_mode) == 0o600
        await workers[1].tell(None, "token-1")
        await workers[0].tell("project-1", None)
        await workers[2].tell(None, None)
    finally:
        for worker in workers:
            await worker.close()
    assert evicted == [
        [(None, "token-1"), (None, None)],
        [("project-1", None), (None, None)],
        [(None, "token-1"), ("project-1", None)],
    ]
    assert not socket_path(tmp_path, 0).exists()


async def test_a_sibling_that_does_not_answer_holds_the_change_for_a_moment_only(
    tmp_path: Path,
) -> None:
    prepare_sockets(tmp_path, 3)
    # Worker 1 is stalled (its socket takes connections, nothing reads them); 2 is dead.
    stalled = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stalled.bind(os.fsdecode(socket_path(tmp_path, 1)))
    stalled.listen(8)
    worker = WorkerChanges(tmp_path, 0, 3)
    unconfirmed = STATS.worker_changes_unconfirmed
    try:
        started = time.monotonic()
        await worker.tell(None, "token-1")
        # Bounded, not forever (the upper bound leaves room for a loaded machine).
        assert TELL_SECONDS <= time.monotonic() - started < TELL_SECONDS + 5
        # Counted on /metrics, one per sibling left unsure, not only logged.
        assert STATS.worker_changes_unconfirmed == unconfirmed + 2
    finally:
        stalled.close()


async def test_a_message_that_is_no_change_evicts_nothing(tmp_path: Path) -> None:
    prepare_sockets(tmp_path, 2)
    evicted: list[tuple[str | None, str | None]] = []
    worker = WorkerChanges(tmp_path, 1, 2)
    await worker.serve(lambda project_id, token_id: evicted.append((project_id, token_id)))
    unhandled: list[dict[str, object]] = []  # what asyncio would log with a traceback
    asyncio.get_running_loop().set_exception_handler(lambda _, context: unhandled.append(context))
    try:
        oversized = b'["' + b"p" * 5000 + b'", null]\n'  # longer than any message
        for message in (b"[1, 2]\n", b"{}\n", b"not json\n", b"[null]\n", oversized):
            reader, writer = await asyncio.open_unix_connection(
                os.fsdecode(socket_path(tmp_path, 1))
            )
            writer.write(message)
            async with asyncio.timeout(2):
                assert await reader.read() == b""  # closed without a confirmation
            writer.close()
        await asyncio.sleep(0.1)  # the handler's last steps run after the connection closed
    finally:
        await worker.close()
    assert evicted == []
    assert unhandled == []  # each was refused with the worker's own warning, not a traceback
