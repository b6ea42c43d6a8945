"""A request body held until it has been checked: in memory while small, on disk beyond that.

Checking a parameter of a large body (``model`` comes after ``messages`` in what the SDKs send)
means reading it whole before any byte goes upstream, as nginx buffers request bodies by default.
Up to :data:`MEMORY_BYTES` the body stays in memory; beyond, it goes to an anonymous temporary file
(already unlinked, mode 0600), so concurrent large uploads do not each hold their body in memory.
Writes to that file land in the page cache; they are the one blocking call on this rare path.
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator, Iterator
from typing import IO

MEMORY_BYTES = 1024 * 1024
_READ_BYTES = 256 * 1024


class BodySpool:
    """Bytes written once, then read back once as an async iterable of chunks."""

    __slots__ = ("_file", "_memory", "_replaced", "size")

    def __init__(self) -> None:
        self._memory: list[bytes] = []
        self._file: IO[bytes] | None = None
        self._replaced: tuple[int, int, bytes] | None = None
        self.size = 0

    def write(self, data: bytes) -> None:
        if not data:
            return
        self.size += len(data)
        if self._file is not None:
            self._file.write(data)
            return
        self._memory.append(data)
        if self.size > MEMORY_BYTES:
            # Kept open across writes and reads; closed by close() or at the end of reading.
            self._file = tempfile.TemporaryFile()  # noqa: SIM115
            self._file.writelines(self._memory)
            self._memory = []

    def replace(self, at: int, length: int, text: bytes) -> None:
        """Read the ``length`` bytes written at ``at`` back as ``text`` instead (once, after the
        last write): a body's few bytes decided only once much more of it had come."""
        self._replaced = (at, length, text)
        self.size += len(text) - length

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        try:
            chunks = self._written()
            if self._replaced is None:
                for chunk in chunks:
                    yield chunk
                return
            at, length, text = self._replaced
            done = 0  # bytes of the written ones read so far
            for chunk in chunks:
                end = done + len(chunk)
                if end <= at or done >= at + length:
                    yield chunk
                else:
                    # (The replaced bytes may straddle chunks: each keeps its part outside them.)
                    head = chunk[: max(at - done, 0)]
                    tail = chunk[max(at + length - done, 0) :]
                    yield head + text + tail if done <= at else tail
                done = end
        finally:
            self.close()

    def _written(self) -> Iterator[bytes]:
        if self._file is None:
            yield from self._memory
            return
        self._file.seek(0)
        while chunk := self._file.read(_READ_BYTES):
            yield chunk

    def close(self) -> None:
        self._memory = []
        if self._file is not None:
            self._file.close()
            self._file = None
