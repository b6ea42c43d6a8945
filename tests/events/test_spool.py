from __future__ import annotations

from pathlib import Path

from llm_proxy.events.builder import build
from llm_proxy.events.spool import Spool
from tests.events.events_support import exchange


def test_replay_resumes_from_the_recorded_offset(tmp_path: Path) -> None:
    path = tmp_path / "spool.jsonl"
    events = [build(exchange(request={"n": i}, response=b"")) for i in range(5)]
    spool = Spool(path)
    spool.append(events)
    first, offset = spool.read(2)
    assert first == events[:2]
    spool.advance(offset)

    reopened = Spool(path)  # a restart
    rest, offset = reopened.read(10)
    assert rest == events[2:]
    reopened.advance(offset)
    assert not reopened.pending and path.read_bytes() == b""
    assert not path.with_name("spool.jsonl.offset").exists()


def test_a_torn_last_line_and_garbage_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "spool.jsonl"
    events = [build(exchange(request={}, response=b"")) for _ in range(2)]
    Spool(path).append(events[:1])
    with path.open("ab") as file:
        file.write(b"garbage\n")
    Spool(path).append(events[1:])
    with path.open("ab") as file:
        file.write(b'{"id": "torn')

    spool = Spool(path)
    got, offset = spool.read(10)
    assert got == events
    spool.advance(offset)
    assert not spool.pending


def test_a_bad_offset_file_means_start_over(tmp_path: Path) -> None:
    path = tmp_path / "spool.jsonl"
    event = build(exchange(request={}, response=b""))
    Spool(path).append([event])
    path.with_name("spool.jsonl.offset").write_text("999999")
    assert Spool(path).read(10)[0] == [event]


def test_a_spool_shorter_than_written_ends_the_read(tmp_path: Path) -> None:
    path = tmp_path / "spool.jsonl"
    events = [build(exchange(request={"n": i}, response=b"")) for i in range(3)]
    spool = Spool(path)
    spool.append(events)
    path.write_bytes(path.read_bytes().splitlines(keepends=True)[0])  # emptied behind its back
    read, offset = spool.read(10)  # (it read on at the end of the file for ever)
    assert (read, offset) == (events[:1], len(path.read_bytes()))
    spool.advance(offset)
    assert not spool.pending
