"""A request body held until it has been checked: in memory while small, on disk beyond that.

Checking a parameter of a large body (``model`` comes after ``messages`` in what the SDKs send)
means reading it whole before any byte goes upstream, as nginx buffers request bodies by default.
Up to :data:`MEMORY_BYTES` the body stays in memory; beyond, it goes to an anonymous temporary file
(already unlinked, mode 0600), so concurrent large uploads do not each hold their body in memory.
Writes to that file land in the page cache; they are the one blocking call on this rare path.
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from typing import IO

MEMORY_BYTES = 1024 * 1024
_READ_BYTES = 256 * 1024


class BodySpool:
    """Bytes written once, then read back once as an async iterable of chunks."""

    __slots__ = ("_file", "_memory", "size")

    def __init__(self) -> None:
        self._memory: list[bytes] = []
        self._file: IO[bytes] | None = None
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

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        try:
            if self._file is None:
                for chunk in self._memory:
                    yield chunk
                return
            self._file.seek(0)
            while chunk := self._file.read(_READ_BYTES):
                yield chunk
        finally:
            self.close()

    def close(self) -> None:
        self._memory = []
        if self._file is not None:
            self._file.close()
            self._file = None
