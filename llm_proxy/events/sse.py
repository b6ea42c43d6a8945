"""Server-Sent Events parsing, per the WHATWG event-stream rules, for captured stream bodies.

Only the ``data`` of each event is needed (OpenAI-style payloads name their own type), so that is
all this returns. Streams made of single ``data:`` lines take a fast path: this runs once per
streamed request, and a long answer has thousands of events.
"""

from __future__ import annotations

import re

_LINE_BREAK = re.compile(rb"\r\n|\r")


def payloads(body: bytes) -> list[bytes]:
    """The data of each event in a captured stream.

    A last event whose final line ended but whose blank line never came is kept (the capture may
    have stopped there); a line cut in the middle is not, since its JSON would be incomplete.
    """
    if b"\r" in body:
        body = _LINE_BREAK.sub(b"\n", body)
    blocks = body.split(b"\n\n")
    last = blocks[-1]
    blocks[-1] = last[: last.rfind(b"\n") + 1]
    out = []
    for block in blocks:
        if block.startswith(b"data: ") and b"\n" not in block:
            out.append(block[6:])
            continue
        data = [
            line[6:] if line[5:6] == b" " else line[5:]
            for line in block.split(b"\n")
            if line.startswith(b"data:")
        ]
        if data:
            out.append(b"\n".join(data))
    return out
