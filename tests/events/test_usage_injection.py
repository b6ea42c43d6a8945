from __future__ import annotations

import random

import orjson
import pytest

from llm_proxy.events.usage_injection import UsageChunkFilter
from tests.events.events_support import CHUNK_HEAD, chunk, sse, usage_chunk

STREAM_EVENTS = [
    b": keep-alive\n\n",
    b"data: " + orjson.dumps({**CHUNK_HEAD, "choices": [], "prompt_filter_results": []}) + b"\n\n",
    *(
        sse(chunk({"content": w}, usage=None, obfuscation="x7"), done=False)
        for w in ["Hel", 'lo "c', '"choices":[], "usage":{}', "\n\n!"]
    ),
    sse(chunk({}, "stop", usage=None), done=False),
]
USAGE_EVENT = sse(usage_chunk(12, 5), done=False)
DONE = b"data: [DONE]\n\n"


def stream_and_expected(newline: bytes = b"\n\n") -> tuple[bytes, bytes, list[bytes]]:
    events = [
        e.replace(b"\n\n", newline) if e.endswith(b"\n\n") else e
        for e in [*STREAM_EVENTS, USAGE_EVENT, DONE]
    ]
    usage = events[-2]
    return b"".join(events), b"".join(e for e in events if e is not usage), events


@pytest.mark.parametrize("newline", [b"\n\n", b"\r\n\r\n", b"\r\r"])
def test_usage_chunk_is_removed_whatever_the_split(newline: bytes) -> None:
    stream, expected, _ = stream_and_expected(newline)
    for cut in range(len(stream) + 1):
        usage_filter = UsageChunkFilter()
        out = (
            usage_filter.feed(stream[:cut]) + usage_filter.feed(stream[cut:]) + usage_filter.flush()
        )
        assert out == expected, cut
        assert usage_filter.removed == 1


def test_every_byte_on_its_own() -> None:
    stream, expected, _ = stream_and_expected()
    usage_filter = UsageChunkFilter()
    out = (
        b"".join(usage_filter.feed(stream[i : i + 1]) for i in range(len(stream)))
        + usage_filter.flush()
    )
    assert out == expected


def test_output_is_prompt_and_holds_only_what_could_be_the_usage_chunk() -> None:
    rng = random.Random(7)
    stream, expected, events = stream_and_expected()
    bounds = []
    position = 0
    for event in events:
        bounds.append((position, position + len(event), event))
        position += len(event)
    for _ in range(300):
        cuts = sorted(rng.sample(range(1, len(stream)), rng.randint(1, 30)))
        usage_filter = UsageChunkFilter()
        sent = b""
        fed = 0
        for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
            sent += usage_filter.feed(stream[start:end])
            fed = end
            complete = [e for s, t, e in bounds if t <= fed and e != events[-2]]
            partial = [(s, e) for s, t, e in bounds if s < fed < t]
            must_have = b"".join(complete)
            if partial and b'"choices":[{' in stream[partial[0][0] : fed]:
                must_have += stream[partial[0][0] : fed]  # known not to be the usage chunk: no hold
            assert sent == must_have, (cuts, fed)
        assert sent + usage_filter.flush() == expected


def test_stream_without_a_usage_chunk_passes_unchanged_and_chunks_are_not_copied() -> None:
    _, _, events = stream_and_expected()
    usage_filter = UsageChunkFilter()
    for event in events[:-2]:
        assert usage_filter.feed(event) is event
    assert usage_filter.flush() == b""


def test_a_client_that_asked_for_usage_gets_it_unchanged() -> None:
    # The proxy only filters when it injected the option; without the filter the bytes are untouched.
    stream, _, _ = stream_and_expected()
    assert USAGE_EVENT in stream


def test_an_incomplete_last_event_is_flushed_as_it_was() -> None:
    usage_filter = UsageChunkFilter()
    cut = USAGE_EVENT[:-3]
    assert usage_filter.feed(cut) == b""
    assert usage_filter.flush() == cut


def test_a_long_event_without_choices_is_not_held() -> None:
    usage_filter = UsageChunkFilter()
    big = b'data: {"padding": "' + b"x" * 20_000
    assert usage_filter.feed(big) == big
    assert usage_filter.feed(b'"}\n\n') == b'"}\n\n'
    assert usage_filter.feed(USAGE_EVENT) == b""
