"""Exact stream usage for clients that did not ask for it, invisibly to them.

The proxy adds ``stream_options.include_usage`` to a streamed chat or legacy completion request as
the body passes (:class:`~llm_proxy.proxy.body_scan.BodyInspector`), and this filter strips what
that adds to the answer from the bytes it relays: the usage-only chunk (``"choices": []`` with a
``usage`` object) and the ``"usage": null`` member the upstream then puts in every other chunk. So
the client sees exactly the stream it would have seen while the event still gets the upstream's
usage.

It runs on the request path, so it is cheap: three precompiled byte searches per event. It holds
back nothing but an incomplete event (which a client cannot use before its blank line anyway); an
event longer than ``_MAX_UNDECIDED`` that is not the usage chunk passes as it comes, unchanged.
"""

from __future__ import annotations

import re

_BOUNDARY = re.compile(rb"\r\n\r\n|\n\n|\r\r")
# The first "choices" key of an event, and the first character of its array.
_CHOICES = re.compile(rb'"choices"\s*:\s*\[\s*(.)', re.DOTALL)
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')
_USAGE_KEY = b'"usage"'
# The member that asking for usage adds to every chunk, after a comma: a `,"` is never inside a
# JSON string (its quote would be escaped), and the lookahead keeps the JSON around it whole.
_NULL_USAGE = re.compile(rb'"usage"\s*:\s*null(?=\s*[,}])')
_JSON_SPACE = b" \t\r\n"
_COMMA = ord(",")
# Incomplete events are held up to this size; a longer one passes as it comes, even if it began
# like the usage chunk.
_MAX_UNDECIDED = 16 * 1024


class UsageChunkFilter:
    """Removes the usage-only chunk from one SSE response; every other byte passes unchanged.

    ``feed`` returns what may go to the client now (often the very chunk it was given), ``flush``
    what is left when the upstream body ends.
    """

    __slots__ = ("_held", "_passing", "_tail", "removed")

    def __init__(self) -> None:
        self._held = b""  # the start of an event that may still be the usage chunk
        self._passing = False  # inside an event already known not to be it, partly sent
        self._tail = b""  # last bytes sent while passing, to see a boundary split across chunks
        self.removed = 0  # usage chunks removed, for tests and metrics

    def feed(self, chunk: bytes) -> bytes:
        if self._held:
            data, self._held = self._held + chunk, b""
        else:
            data = chunk
        size = len(data)
        pos = 0
        edits: list[tuple[int, int, bytes]] = []  # byte ranges and what replaces them, in order
        if self._passing:
            pos = self._end_of_passing(data)
            if pos < 0:
                self._tail = (self._tail + data)[-3:]
                return data
        while pos < size:
            boundary = _BOUNDARY.search(data, pos)
            end = boundary.end() if boundary else size
            if boundary is None:
                # Whatever it looks like: held without a bound, an event that never ends (an
                # upstream's) would grow the proxy without end, and every chunk added to it be
                # copied and searched again. A usage chunk is a fraction of the bound.
                if end - pos < _MAX_UNDECIDED:
                    edits.append((pos, size, b""))
                    self._held = data[pos:]
                else:
                    self._passing = True
                    self._tail = data[-3:]
                break
            key = data.find(_USAGE_KEY, pos, end)
            if key != -1:
                # That "usage" may be a string (a content delta, a tool's name) before the member.
                null_usage = _NULL_USAGE.search(data, key, end)
                comma = (key if null_usage is None else null_usage.start()) - 1
                while data[comma] in _JSON_SPACE:
                    comma -= 1
                if null_usage is not None and data[comma] == _COMMA:
                    edits.append((comma, null_usage.end(), b""))
                else:
                    choices = _CHOICES.search(data, pos, end)
                    usage_only = choices is not None and choices.group(1) == b"]"
                    if usage_only and _USAGE_OBJECT.search(data, pos, end):
                        edits.append((pos, end, b""))
                        self.removed += 1
            pos = end
        if not edits:
            return data
        if len(edits) == 1:  # the common case: one event, its null usage taken out
            edit_start, edit_end, replacement = edits[0]
            return data[:edit_start] + replacement + data[edit_end:]
        kept = []
        start = 0
        for edit_start, edit_end, replacement in edits:
            kept.append(data[start:edit_start])
            kept.append(replacement)
            start = edit_end
        kept.append(data[start:])
        return b"".join(kept)

    def _end_of_passing(self, data: bytes) -> int:
        """Where the event being passed through ends in ``data``, or -1 if it goes on."""
        # The tail holds no whole boundary, so a first match that reaches into it straddles.
        held = len(self._tail)
        straddling = _BOUNDARY.search(self._tail + data[:3])
        if straddling and straddling.start() < held < straddling.end():
            self._passing, self._tail = False, b""
            return straddling.end() - held
        boundary = _BOUNDARY.search(data)
        if boundary is None:
            return -1
        self._passing, self._tail = False, b""
        return boundary.end()

    def flush(self) -> bytes:
        """Bytes still held when the body ended: an incomplete event, passed on as it was."""
        held, self._held = self._held, b""
        return held
