"""Answers longer than the capture: their usage comes from the end kept past the captured head."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from llm_proxy.events.builder import build
from llm_proxy.events.usage import from_upstream, usage_in_tail
from llm_proxy.pricing import load_prices
from llm_proxy.proxy.exchange import RESPONSE_TAIL_BYTES, CappedBuffer, Exchange
from tests.events.events_support import chunk, exchange, sse, usage_chunk

SHIPPED_PRICES = load_prices(Path(__file__).parents[2] / "config" / "prices.yaml")
REQUEST = {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "Go on."}]}
HEAD = 4096  # the capture limit of these exchanges: every answer here is longer
TAIL = 2048


def long_stream(words: int, usage: dict[str, object] | None) -> bytes:
    pieces = [chunk({"content": f"word{i} "}) for i in range(words)]
    if usage is not None:
        pieces.append(usage)
    return sse(*pieces)


def long_exchange(response: bytes, **fields: Any) -> Exchange:
    """An exchange whose answer is longer than its capture, with a tail kept."""
    fields.setdefault("request", REQUEST)
    fields.setdefault("content_type", "text/event-stream")
    fields.setdefault("response_tail_limit", TAIL)
    return exchange(response=response, response_limit=HEAD, **fields)


def test_the_buffer_keeps_the_head_and_at_least_the_last_tail_bytes_in_whole_chunks() -> None:
    body = bytes(range(256)) * 40  # 10,240 bytes
    buffer = CappedBuffer(HEAD, TAIL)
    for start in range(0, len(body), 300):
        buffer.add(body[start : start + 300])
    assert buffer.getvalue() == body[:HEAD] and buffer.truncated
    assert TAIL <= len(buffer.tail) < TAIL + 300
    assert body.endswith(buffer.tail)
    assert buffer.tail_size == len(buffer.tail)


def test_a_buffer_without_a_tail_limit_keeps_no_tail() -> None:
    buffer = CappedBuffer(10)
    buffer.add(b"x" * 100)
    assert (buffer.getvalue(), buffer.tail, buffer.truncated) == (b"x" * 10, b"", True)


def test_a_stream_longer_than_the_capture_is_settled_with_its_upstream_usage() -> None:
    answer = long_stream(400, usage_chunk(12, 3000))
    ex = long_exchange(answer)
    event = build(ex, prices=SHIPPED_PRICES)
    assert event["usage"] == {
        "prompt_tokens": 12,
        "completion_tokens": 3000,
        "total_tokens": 3012,
        "source": "upstream",
    }
    assert event["cost_usd"] == pytest.approx((12 * 2.50 + 3000 * 10.00) / 1e6)


def test_the_tail_reaches_the_events_process_with_the_exchange() -> None:
    answer = long_stream(400, usage_chunk(12, 3000))
    ex = long_exchange(answer)
    again = Exchange.from_wire(ex.to_wire())
    assert again.response_body.tail == ex.response_body.tail and answer.endswith(
        again.response_body.tail
    )
    assert again.captured_bytes == HEAD + len(ex.response_body.tail) + ex.request_body.size
    assert build(again)["usage"]["source"] == "upstream"  # type: ignore[index]


def test_a_json_answer_longer_than_the_capture_is_priced_with_its_cached_tokens() -> None:
    answer = orjson.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": "gpt-4o-2024-08-06",
            "choices": [
                {"index": i, "message": {"role": "assistant", "content": "x" * 3000}}
                for i in range(4)
            ],
            "usage": {
                "prompt_tokens": 2000,
                "completion_tokens": 80000,
                "total_tokens": 82000,
                "prompt_tokens_details": {"cached_tokens": 1536},
            },
            "system_fingerprint": "fp_1",
        }
    )
    ex = long_exchange(
        answer, request={**REQUEST, "stream": False}, content_type="application/json"
    )
    event = build(ex, prices=SHIPPED_PRICES)
    assert event["usage"] is not None and event["usage"]["source"] == "upstream"
    assert event["usage"]["completion_tokens"] == 80000
    # 464 x $2.50/M + 1,536 cached x $1.25/M + 80,000 x $10/M
    assert event["cost_usd"] == pytest.approx(0.00116 + 0.00192 + 0.8)


def test_a_responses_stream_longer_than_the_capture_uses_its_completed_usage() -> None:
    final = {
        "id": "resp_1",
        "object": "response",
        "model": "gpt-4.1",
        "output": [{"type": "message", "content": [{"type": "output_text", "text": "y" * 3000}]}],
        "usage": {"input_tokens": 15, "output_tokens": 3000, "total_tokens": 3015},
        "user": None,
        "metadata": {"usage": "not this one"},
    }
    deltas = b"".join(
        b"event: response.output_text.delta\ndata: "
        + orjson.dumps({"type": "response.output_text.delta", "delta": "y" * 30})
        + b"\n\n"
        for _ in range(300)
    )
    stream = (
        deltas
        + b"event: response.completed\ndata: "
        + orjson.dumps({"type": "response.completed", "response": final})
        + b"\n\n"
    )
    ex = long_exchange(
        stream,
        path="/v1/responses",
        request={"model": "gpt-4.1", "input": "go", "stream": True},
        response_tail_limit=RESPONSE_TAIL_BYTES,
    )
    event = build(ex, prices=SHIPPED_PRICES)
    assert event["usage"] == {
        "prompt_tokens": 15,
        "completion_tokens": 3000,
        "total_tokens": 3015,
        "source": "upstream",
    }


def test_a_long_answer_whose_end_holds_no_usage_is_still_estimated() -> None:
    ex = long_exchange(long_stream(400, None))
    event = build(ex)
    assert event["usage"] is not None and event["usage"]["source"] == "estimated"


@pytest.mark.parametrize(
    "tail",
    [
        # A model that writes a usage object in its text: inside a JSON string every quote is
        # escaped, so it never reads as a key.
        orjson.dumps({"content": 'said "usage": {"prompt_tokens": 999999} here'}),
        orjson.dumps({"content": '\\"usage\\": {"prompt_tokens": 999999}'}),
        b'"usage": {"prompt_tokens": 5, "completion_tok',  # cut off
        b'"usage": null, "x": 1',
        b'"usage": {"completion_tokens": 4}',  # no prompt count: not a usage
    ],
)
def test_what_is_not_a_readable_usage_object_is_not_taken_for_one(tail: bytes) -> None:
    assert usage_in_tail(tail) is None


def test_the_last_readable_usage_object_wins() -> None:
    tail = (
        b'data: {"usage": {"prompt_tokens": 1, "completion_tokens": 1}}\n\n'
        b'data: {"usage": {"prompt_tokens": 12, "completion_tokens": 30}}\n\n'
        b'data: {"usage": {"prompt_tokens": 99, "compl'
    )
    found = usage_in_tail(tail)
    assert found is not None and from_upstream(found) == {
        "prompt_tokens": 12,
        "completion_tokens": 30,
        "total_tokens": 42,
        "source": "upstream",
    }


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        ({"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": -1_000_000}, 15),
        ({"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 3}, 15),
        ({"prompt_tokens": 10, "completion_tokens": -5, "total_tokens": 5}, 10),
        ({"prompt_tokens": -10, "completion_tokens": 5}, None),
    ],
)
def test_impossible_counts_never_lower_what_a_request_is_counted(
    usage: dict[str, int], expected: int | None
) -> None:
    # An upstream reporting negative tokens would shrink its token's tpm window.
    found = from_upstream({"usage": usage})
    assert (found["total_tokens"] if found else None) == expected
