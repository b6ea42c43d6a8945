"""Whether a stream whose client left had already relayed its whole answer.

SDKs close a stream as soon as they read its last event, which may be before the upstream's end of
body arrives: that client left with the whole answer, and is not recorded as gone. This runs only
when a stream's connection ends early, never per chunk.
"""

from __future__ import annotations

import re

from llm_proxy.proxy.exchange import RESPONSE_TAIL_BYTES, CappedBuffer

_SSE_DONE = re.compile(rb"(?:^|\n)data: ?\[DONE\]\s*$")
# A key's closing quote is never escaped, so this matches no text inside a JSON string.
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')
_EVENT_ENDS = (b"\r\n\r\n", b"\n\n", b"\r\r")


def answered_whole(before_last: bytes, last: bytes, capture: CappedBuffer) -> bool:
    """Whether the relayed stream, ending with the chunks ``before_last`` and ``last`` and
    captured in ``capture``, ended with its last event: a chat stream's ``data: [DONE]``, or an
    event that carries the answer's usage, which OpenAI sends once, last (a Responses stream's
    response.completed, .incomplete or .failed, after which no [DONE] comes)."""
    if _SSE_DONE.search(before_last[-32:] + last):
        return True
    # The capture's end is the stream's: its tail once the head is full, else the whole body.
    end = capture.tail if capture.tail_chunks else capture.getvalue()[-RESPONSE_TAIL_BYTES:]
    return _last_event_carries_usage(end)


def _last_event_carries_usage(end: bytes) -> bool:
    for boundary in _EVENT_ENDS:
        if end.endswith(boundary):
            body = end[: -len(boundary)]
            break
    else:
        return False  # cut inside an event
    start = max(body.rfind(boundary) for boundary in _EVENT_ENDS)
    return _USAGE_OBJECT.search(body, start + 1) is not None
