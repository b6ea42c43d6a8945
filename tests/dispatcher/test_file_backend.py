from __future__ import annotations

import os
from pathlib import Path

import orjson
import pytest
from prometheus_client import REGISTRY

from dispatcher.backends import BackendError
from dispatcher.backends.file import FileBackend
from llm_proxy.events.builder import build
from llm_proxy.events.event import Event
from tests.events.events_support import exchange


def events(n: int) -> list[Event]:
    return [build(exchange(request={"n": i}, response=b"")) for i in range(n)]


def lines(path: Path) -> list[int]:
    return (
        [orjson.loads(line)["request"]["n"] for line in path.read_bytes().splitlines()]
        if path.exists()
        else []
    )


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


async def test_one_json_event_per_line_appended_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "events.jsonl"
    for start in (0, 3):
        backend = FileBackend(path)
        await backend.start()
        sent = events(start + 3)[start:]
        assert await backend.send(sent) == {}
        await backend.close()
    assert lines(path) == [0, 1, 2, 3, 4, 5]


async def test_rotates_by_size_keeping_backups(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    one = len(orjson.dumps(events(1)[0])) + 1
    backend = FileBackend(path, max_bytes=one * 2 + 10, backups=2)
    await backend.start()
    batch = events(8)
    for i in range(0, 8, 2):
        await backend.send(batch[i : i + 2])  # a batch is never split across files
    await backend.close()
    assert lines(path) == [6, 7]
    assert lines(path.with_name("events.jsonl.1")) == [4, 5]
    assert lines(path.with_name("events.jsonl.2")) == [2, 3]
    assert not path.with_name("events.jsonl.3").exists()


async def test_without_backups_rotation_starts_the_file_over(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    backend = FileBackend(path, max_bytes=10, backups=0)
    await backend.start()
    await backend.send(events(2)[:1])
    await backend.send(events(2)[1:])
    await backend.close()
    assert lines(path) == [1]
    assert names(tmp_path) == ["events.jsonl"]


async def test_a_failed_write_is_retryable() -> None:
    backend = FileBackend(Path("/dev/full"))
    await backend.start()
    try:
        with pytest.raises(BackendError) as raised:
            await backend.send(events(1))
    finally:
        await backend.close()
    assert raised.value.rejection.retryable


async def test_a_pipe_gets_each_event_once(tmp_path: Path) -> None:
    # ``--path /dev/stdout`` in a container, or a FIFO another program reads: a pipe cannot be
    # fsynced (EINVAL). That is no failed write: the reader has the lines already, and a retry
    # would write them again, for ever.
    fifo = tmp_path / "events.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    backend = FileBackend(fifo)
    await backend.start()
    try:
        assert await backend.send(events(2)) == {}
        assert await backend.send(events(3)[2:]) == {}
        received = os.read(reader, 1 << 16)
    finally:
        await backend.close()
        os.close(reader)
    assert [orjson.loads(line)["request"]["n"] for line in received.splitlines()] == [0, 1, 2]


async def test_an_event_that_cannot_be_written_is_refused_for_good_and_the_rest_written(
    tmp_path: Path,
) -> None:
    # No longer built (a deep body is shown as text), but one from an older version must not
    # hold up the batch by being retried forever.
    path = tmp_path / "events.jsonl"
    sent = events(3)
    deep: object = 1
    for _ in range(300):
        deep = [deep]
    sent[1]["response"] = deep
    backend = FileBackend(path)
    await backend.start()
    refused = await backend.send(sent)
    await backend.close()
    assert list(refused) == [1] and not refused[1].retryable
    assert lines(path) == [0, 2]


async def test_a_line_torn_by_a_killed_writer_is_cut_before_the_next_write(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    before = REGISTRY.get_sample_value("llm_proxy_dispatcher_torn_lines_cut_total") or 0.0
    sent = events(3)
    backend = FileBackend(path)
    await backend.start()
    await backend.send(sent[:2])
    await backend.close()
    # What a dispatcher killed mid-write leaves: the first bytes of a long line, no newline.
    torn = build(exchange(request={"n": -1, "pad": "y" * 200_000}, response=b""))
    with path.open("ab") as file:
        file.write(orjson.dumps(torn)[:150_000])
    backend = FileBackend(path)
    await backend.start()
    await backend.send(sent[2:])
    await backend.close()
    assert lines(path) == [0, 1, 2]
    assert REGISTRY.get_sample_value("llm_proxy_dispatcher_torn_lines_cut_total") == before + 1
