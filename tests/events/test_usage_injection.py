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


def unasked(event: bytes) -> bytes:
    """An event as the client would have had it without asking for usage: no "usage":null."""
    return event.replace(b',"usage":null', b"")


def stream_and_expected(newline: bytes = b"\n\n") -> tuple[bytes, bytes, list[bytes]]:
    events = [
        e.replace(b"\n\n", newline) if e.endswith(b"\n\n") else e
        for e in [*STREAM_EVENTS, USAGE_EVENT, DONE]
    ]
    usage = events[-2]
    return b"".join(events), b"".join(unasked(e) for e in events if e is not usage), events


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


def test_output_is_prompt_and_holds_only_an_incomplete_event() -> None:
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
        for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
            sent += usage_filter.feed(stream[start:end])
            # Every complete event has gone out (a client cannot use an incomplete one).
            complete = [unasked(e) for s, t, e in bounds if t <= end and e != events[-2]]
            assert sent == b"".join(complete), (cuts, end)
        assert sent + usage_filter.flush() == expected


def test_a_long_event_passes_as_it_comes_unchanged() -> None:
    usage_filter = UsageChunkFilter()
    event = sse(chunk({"content": "x" * 20_000}, usage=None), done=False)
    out = usage_filter.feed(event[:18_000]) + usage_filter.feed(event[18_000:])
    assert out == event  # passed before its end came, so its "usage":null too


def test_events_without_usage_pass_unchanged_and_are_not_copied() -> None:
    _, _, events = stream_and_expected()
    usage_filter = UsageChunkFilter()
    for event in events[:-2]:
        out = usage_filter.feed(event)
        if b'"usage"' in event:
            assert out == unasked(event) != event
        else:
            assert out is event
    assert usage_filter.flush() == b""


@pytest.mark.parametrize(
    ("member", "kept"),
    [
        (b', "usage": null}', b"}"),  # spaced, as Python's json.dumps writes it
        (b',"usage":null,"obfuscation":"x"}', b',"obfuscation":"x"}'),
        (b',"usage":nullx}', b',"usage":nullx}'),  # not JSON null: left alone
        (b',"usage":{"a":1},"b":null}', b',"usage":{"a":1},"b":null}'),
    ],
)
def test_only_a_null_usage_member_is_taken_out(member: bytes, kept: bytes) -> None:
    head = b'data: {"choices":[{"delta":{"content":"a \\",\\"usage\\":null"}}]'
    out = UsageChunkFilter().feed(head + member + b"\n\n")
    assert out == head + kept + b"\n\n"


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
