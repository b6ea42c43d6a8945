"""Sending the events of a dead-letter file to a backend again (``llm-proxy dispatcher replay``).

The file is only read. Events go out in batches, retried with capped backoff while the backend's
refusals are retryable; every event not delivered in the end (refused, given up on, or not sent
because the backend refused the credentials) goes to a *new* dead-letter file, created at the first
failure. So after a replay that file holds exactly what is still undelivered, and it is the one to
replay next: the old one also holds what was just delivered. A replay interrupted midway leaves
its progress next to the file (:mod:`dispatcher.replay_progress`): run again, it resumes there.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from dispatcher.backends import Backend, BackendError, Rejection
from dispatcher.deadletter import DeadLetterFile
from dispatcher.replay_progress import Progress, ProgressFile
from dispatcher.retry import Backoff, asked_wait
from dispatcher.worker import AuthFailed, BackendStartError
from llm_proxy.events import event as wire
from llm_proxy.events.event import Event

# What each service does with an event it already has, for the operator who replays a file twice.
IDEMPOTENCY = {
    "lunary": "Lunary keeps one run per event (the run id comes from the event id): an event "
    "it already has is counted as delivered, not stored twice.",
    "helicone": "each log carries the event id as Helicone-Request-Id, but Helicone does not "
    "promise to drop a repeated id: an event it already has may be logged twice.",
    "cloudwatch": "CloudWatch Logs does not deduplicate: an event it already has is stored twice "
    '(each message carries the event\'s "id").',
    "file": 'the file is appended to: an event it already has appears twice (same "id").',
}


@dataclass(frozen=True, slots=True)
class Line:
    """One line of a dead-letter file: its event, or (``event`` None) why it holds none."""

    event: Event | None
    backend: str  # the backend that refused it before; "?" when the line does not say
    text: str = ""  # an unreadable line, kept whole
    reason: str = ""  # why it is unreadable


def parse(number: int, raw: bytes) -> Line:
    text = raw.decode(errors="backslashreplace").rstrip("\n")
    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return _unreadable(number, "?", text, str(exc))
    if not isinstance(record, dict):
        return _unreadable(number, "?", text, "not a JSON object")
    backend = str(record.get("backend", "?"))
    if isinstance(record.get("line"), str):  # unreadable already: carry it on as it was
        return Line(None, backend, record["line"], str(record.get("reason", "")))
    try:
        # The checks the bus applies to what it reads back, so a backend gets the fields it needs.
        return Line(wire.loads(orjson.dumps(record.get("event"))), backend)
    except ValueError:
        return _unreadable(number, backend, text, "no event in the line")


def _unreadable(number: int, backend: str, text: str, problem: str) -> Line:
    return Line(None, backend, text, f"unreadable dead-letter line {number}: {problem}")


class _Reader:
    """Blocking reads of a dead-letter file, a batch at a time (run in a thread), from
    ``offset`` (bytes), which is after line ``number``."""

    def __init__(self, path: Path, offset: int = 0, number: int = 0) -> None:
        self._file: io.BufferedReader = open(path, "rb")  # noqa: SIM115  # closed by close()
        self._file.seek(offset)
        self._number = number

    @property
    def offset(self) -> int:
        return self._file.tell()

    @property
    def number(self) -> int:
        """Lines read so far, blank ones included: the number of the last one."""
        return self._number

    def next(self, count: int) -> list[Line]:
        lines: list[Line] = []
        while len(lines) < count:
            raw = self._file.readline()
            if not raw:
                break
            self._number += 1
            if raw.strip():
                lines.append(parse(self._number, raw))
        return lines

    def close(self) -> None:
        self._file.close()


@dataclass(slots=True)
class Tally:
    """What a dry run finds in a dead-letter file."""

    events: int = 0
    unreadable: int = 0
    by_backend: Counter[str] = field(default_factory=Counter)


def count(path: Path) -> Tally:
    tally = Tally()
    reader = _Reader(path)
    try:
        while lines := reader.next(1000):
            for line in lines:
                if line.event is None:
                    tally.unreadable += 1
                else:
                    tally.events += 1
                    tally.by_backend[line.backend] += 1
    finally:
        reader.close()
    return tally


@dataclass(slots=True)
class Report:
    read: int = 0  # lines read, unreadable ones included
    delivered: int = 0
    failed: int = 0  # written to the new dead-letter file, unreadable ones included
    unreadable: int = 0
    auth_failure: str | None = None  # what the backend answered when it refused the credentials
    interrupted_after: int | None = None  # the line of FILE handled when ``stop`` was set
    progress_unkept: str | None = None  # why the progress could not be kept, if it could not


async def replay(
    path: Path,
    backend: Backend,
    output: DeadLetterFile,
    *,
    batch_size: int = 100,
    max_attempts: int = 3,
    backoff: Backoff | None = None,
    progress: ProgressFile | None = None,
    start: Progress | None = None,
    stop: asyncio.Event | None = None,
) -> Report:
    """Send the events of ``path`` to ``backend``; what fails goes to ``output``.

    With ``progress``, how far it got is kept there after every batch (and removed at the end),
    so that a replay interrupted for any reason resumes from it (``start``) when run again.
    ``stop`` set, it stops after the batch in hand: ``interrupted_after`` then says where.

    Raises :class:`~dispatcher.worker.BackendStartError` or :class:`~dispatcher.worker.AuthFailed`
    when the backend cannot start: then nothing was sent and nothing written.
    """
    try:
        await backend.start()
    except Exception as exc:
        await backend.close()
        if isinstance(exc, BackendError) and exc.rejection.auth:
            raise AuthFailed(backend.name, exc.rejection.reason, 0) from None
        raise BackendStartError(f"{backend.name}: {exc}") from exc
    sender = _Sender(backend, output, max_attempts, backoff or Backoff())
    report = sender.report
    found = progress  # the file of the progress, even once it can no longer be kept
    begin = start or Progress(0, 0, output.path)
    reader = await asyncio.to_thread(_Reader, path, begin.offset, begin.line)
    try:
        while True:
            if stop is not None and stop.is_set():
                report.interrupted_after = reader.number
                break
            lines = await asyncio.to_thread(reader.next, batch_size)
            if not lines:
                break
            await sender.send(lines)
            if progress is not None:
                # After the batch's failures are on disk: none is lost, none is sent twice.
                done = Progress(reader.offset, reader.number, output.path)
                try:
                    await asyncio.to_thread(progress.save, done)
                except OSError as exc:
                    # FILE's directory read-only, say: the replay goes on, without a resume.
                    report.progress_unkept = f"{progress.path}: {exc.strerror}"
                    progress = None
    finally:
        await asyncio.to_thread(reader.close)
        await backend.close()
    if progress is not None and report.interrupted_after is None:
        await asyncio.to_thread(progress.remove)
    elif found is not None and report.progress_unkept is not None and start is not None:
        # The progress file found at the start no longer says where this replay is.
        with contextlib.suppress(OSError):
            await asyncio.to_thread(found.remove)
    return report


class _Sender:
    def __init__(
        self, backend: Backend, output: DeadLetterFile, max_attempts: int, backoff: Backoff
    ) -> None:
        self.report = Report()
        self._backend = backend
        self._output = output
        self._max_attempts = max_attempts
        self._backoff = backoff

    async def send(self, lines: Sequence[Line]) -> None:
        report = self.report
        name = self._backend.name
        report.read += len(lines)
        unreadable = [(line.text, line.reason) for line in lines if line.event is None]
        await self._output.write_unreadable(name, unreadable)
        report.unreadable += len(unreadable)
        report.failed += len(unreadable)
        events = [line.event for line in lines if line.event is not None]
        if report.auth_failure is None:
            failed = await self._deliver(events)
        else:
            reason = f"not sent: {name} refused the credentials ({report.auth_failure})"
            failed = [(event, reason) for event in events]
        await self._output.write(name, failed)
        report.failed += len(failed)

    async def _deliver(self, events: list[Event]) -> list[tuple[Event, str]]:
        """Send with retries; the events that failed in the end, with why."""
        failed: list[tuple[Event, str]] = []
        pending = events
        attempt = 0
        while pending:
            attempt += 1
            refused = await self._attempt(pending)
            self.report.delivered += len(pending) - len(refused)
            auth = next((r for r in refused.values() if r.auth), None)
            if auth is not None:
                self.report.auth_failure = auth.reason
                reason = f"not sent: {self._backend.name} refused the credentials ({auth.reason})"
                return failed + [(pending[i], reason) for i in sorted(refused)]
            retry = [(pending[i], r.reason) for i, r in sorted(refused.items()) if r.retryable]
            failed += [
                (pending[i], r.reason) for i, r in sorted(refused.items()) if not r.retryable
            ]
            if retry and attempt >= self._max_attempts:
                failed += [(e, f"gave up after {attempt} attempts: {why}") for e, why in retry]
                break
            pending = [event for event, _ in retry]
            if pending:
                await asyncio.sleep(self._backoff.delay(attempt, asked_wait(refused.values())))
        return failed

    async def _attempt(self, events: Sequence[Event]) -> dict[int, Rejection]:
        try:
            return await self._backend.send(events)
        except BackendError as exc:
            return dict.fromkeys(range(len(events)), exc.rejection)
        except Exception as exc:  # a malformed event, say: retried, then kept in the output
            return dict.fromkeys(range(len(events)), Rejection(repr(exc), retryable=True))
