"""The body inspector: watched values, well-formedness and exact usage injection, in any chunking."""

from __future__ import annotations

import random
import re
import tracemalloc
from collections.abc import Iterator, Sequence
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm_proxy.proxy.body_scan import (
    _STRING_BODY,
    OPTIONS_HOLD_LIMIT,
    TOO_LARGE,
    BodyInspector,
    _string_body_end,
    ask_usage,
)

TAIL = b',"stream_options":{"include_usage":true}'
FOR_NULL = b'{"include_usage":true}'
MISSING = object()


def feed_all(chunks: Sequence[bytes], **options: Any) -> tuple[bytes, BodyInspector]:
    inspector = BodyInspector(**options)
    out = b"".join(inspector.feed(chunk) for chunk in chunks) + inspector.finish()
    return out, inspector


def splits(body: bytes) -> Iterator[list[bytes]]:
    """The body whole, cut once at every position, and byte by byte."""
    yield [body]
    for cut in range(len(body) + 1):
        yield [body[:cut], body[cut:]]
    yield [body[i : i + 1] for i in range(len(body))]


def outcome(out: bytes, inspector: BodyInspector) -> tuple[object, ...]:
    return (
        out,
        inspector.values,
        inspector.is_object,
        inspector.well_formed,
        inspector.stream,
        inspector.usage_injected,
        inspector.modified,
    )


def scan(body: bytes, **options: Any) -> tuple[bytes, BodyInspector]:
    """Scan the body in every chunking, insist they all agree, and return the whole-body run."""
    out, inspector = feed_all([body], **options)
    expected = outcome(out, inspector)
    for chunks in splits(body):
        assert outcome(*feed_all(chunks, **options)) == expected, chunks
    return out, inspector


def watched(body: bytes, *keys: str, **options: Any) -> dict[str, list[object]]:
    out, inspector = scan(body, watch=frozenset(keys), **options)
    assert out == body and inspector.well_formed
    return inspector.values


def injected(body: bytes) -> tuple[bytes, BodyInspector]:
    return scan(body, inject_usage=True)


# watched values


@pytest.mark.parametrize(
    ("text", "value"),
    [
        (b'"gpt-4o"', "gpt-4o"),
        (
            b'"gpt\\u002d4o \\"quoted\\" \\\\ \\/ \\n \\u00e9 \\ud83d\\ude00"',
            'gpt-4o "quoted" \\ / \n é 😀',
        ),
        (b"42", 42),
        (b"-0.5e-3", -0.0005),
        (b"true", True),
        (b"false", False),
        (b"null", None),
        (b'[1, {"a": [true]}, "x"]', [1, {"a": [True]}, "x"]),
        (b'{"a": {"b": null}, "c": "}"}', {"a": {"b": None}, "c": "}"}),
        (b"{}", {}),
        (b"[]", []),
    ],
)
def test_watched_value_is_decoded_as_json(text: bytes, value: object) -> None:
    body = b'{"before": [1, "model"], "model": ' + text + b', "after": {"model": 1}}'
    assert watched(body, "model") == {"model": [value]}


def test_watched_key_without_occurrence_has_no_values() -> None:
    assert watched(b'{"messages": [{"model": "x"}], "m": "model"}', "model", "user") == {
        "model": [],
        "user": [],
    }


def test_every_occurrence_of_a_duplicated_key_is_reported_in_order() -> None:
    body = b'{"model": "allowed", "n": 1, "model": "forbidden", "model": {"x": 1}}'
    assert watched(body, "model") == {"model": ["allowed", "forbidden", {"x": 1}]}


@pytest.mark.parametrize(
    "key", [b'"mod\\u0065l"', b'"\\u006d\\u006F\\u0064\\u0065\\u006c"', b'"mode\\u006C"']
)
def test_escaped_key_is_the_key_it_decodes_to(key: bytes) -> None:
    body = b'{"model": "first", ' + key + b': "second"}'
    assert watched(body, "model") == {"model": ["first", "second"]}


def test_key_that_only_looks_like_a_watched_key_does_not_count() -> None:
    body = b'{"Model": 1, "model ": 2, "mode": 3, "models": 4, "model\\u0000": 5}'
    assert watched(body, "model") == {"model": []}


def test_non_ascii_watched_key_matches_raw_and_escaped() -> None:
    body = '{"modèle": 1, "mod\\u00e8le": 2}'.encode()
    assert watched(body, "modèle") == {"modèle": [1, 2]}


def test_keys_inside_nested_values_do_not_count() -> None:
    body = (
        b'{"messages": [{"role": "user", "model": "decoy", "content": "\\"model\\": \\"x\\""}],'
        b' "meta": {"model": "decoy"}, "model": "real"}'
    )
    assert watched(body, "model") == {"model": ["real"]}


def test_top_level_array_has_no_keys() -> None:
    body = b'[{"model": "x"}, "model", {"stream": true}]'
    out, inspector = scan(body, watch=frozenset({"model"}))
    assert out == body
    assert inspector.values == {"model": []}
    assert inspector.well_formed and not inspector.is_object and not inspector.stream


@pytest.mark.parametrize(
    ("text", "limit", "large"),
    [
        (b'"abcdef"', 8, False),
        (b'"abcdefg"', 8, True),
        (b'"\\u00e9"', 8, False),
        (b'"a\\u00e9"', 8, True),
        (b"12345678", 8, False),
        (b"123456789", 8, True),
        (b'{"a": 1}', 8, False),
        (b'{"a": 12}', 8, True),
        (b"[1, 2, 3]", 9, False),
        (b"[1, 2, 3]", 8, True),
    ],
)
def test_value_whose_raw_text_exceeds_the_limit_is_too_large(
    text: bytes, limit: int, large: bool
) -> None:
    body = b'{"model": ' + text + b', "model": "small"}'
    first, second = watched(body, "model", max_value_bytes=limit)["model"]
    assert (first is TOO_LARGE) is large
    assert second == "small"


def test_huge_watched_value_is_not_buffered() -> None:
    chunk = b"A" * 65536
    inspector = BodyInspector(frozenset({"model"}), inject_usage=True)
    tracemalloc.start()
    try:
        assert inspector.feed(b'{"stream": true, "model": "') == b'{"stream": true, "model": "'
        for _ in range(128):
            assert inspector.feed(chunk) is chunk
        assert inspector.feed(b'"}') == b'"'
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert inspector.finish() == TAIL + b"}"
    assert inspector.values == {"model": [TOO_LARGE]} and inspector.usage_injected
    assert peak < 256 * 1024


def test_watched_value_orjson_cannot_decode_makes_the_body_not_well_formed() -> None:
    for text in (b'"\\ud800"', b"1e400", b'"\xff"'):
        body = b'{"model": ' + text + b', "stream": true}'
        out, inspector = scan(body, watch=frozenset({"model"}), inject_usage=True)
        assert out == body and not inspector.well_formed and not inspector.usage_injected


# stream flag


@pytest.mark.parametrize(
    ("body", "stream"),
    [
        (b'{"stream": true}', True),
        (b'{"stream":true,"x":[]}', True),
        (b'{"str\\u0065am": true}', True),
        (b'{"stream": false}', False),
        (b'{"stream": "true"}', False),
        (b'{"stream": 1}', False),
        (b'{"stream": [true]}', False),
        (b'{"stream": {"stream": true}}', False),
        (b'{"stream": null}', False),
        (b'{"stream": true, "stream": false}', False),
        (b'{"stream": false, "stream": true}', True),
        (b'{"messages": [{"stream": true}], "x": {"stream": true}}', False),
        (b'{"content": "\\"stream\\": true", "stream ": true}', False),
        (b"{}", False),
    ],
)
def test_stream_is_the_last_top_level_stream_being_literal_true(body: bytes, stream: bool) -> None:
    out, inspector = scan(body)
    assert out == body and inspector.well_formed and inspector.stream is stream


# shapes


def test_empty_object_is_a_well_formed_object() -> None:
    out, inspector = scan(b" { } \n", watch=frozenset({"model"}))
    assert out == b" { } \n"
    assert inspector.is_object and inspector.well_formed and inspector.values == {"model": []}


@pytest.mark.parametrize(
    "body", [b"[]", b' [1, [2, {}], "x"] ', b"12", b'"text"', b"null", b" -1.5E+2 "]
)
def test_other_top_level_values_are_well_formed_but_not_objects(body: bytes) -> None:
    out, inspector = scan(body, inject_usage=True)
    assert out == body and inspector.well_formed and not inspector.is_object
    assert not inspector.usage_injected


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"   ",
        b'{"stream": true',
        b'{"stream": true}}',
        b'{"stream": true]',
        b'{"a": [1, 2}, "stream": true}',
        b'{"stream": true} x',
        b'{"stream": true} {}',
        b'{"stream": true}\x00',
        b'{"stream": true, "a": "unterminated}',
        b'{"stream": true, "a": "bad \\x escape"}',
        b'{"stream": true, "a": "bad \\u12G4 escape"}',
        b'{"stream": true, "a": "cut \\u12"}',
        b'{"stream": true, "a": "raw\ncontrol"}',
        b'{"stream": true, "a": tru}',
        b'{"stream": true, "a": True}',
        b'{"stream": true, "a": 01}',
        b'{"stream": true, "a": 1.}',
        b'{"stream": true, "a": 1 2}',
        b'{"stream": true, "a": - 1}',
        b'{"stream": true, "a": 1,}',
        b'{"stream": true, "a" 1}',
        b'{"stream": true, "a":: 1}',
        b'{"stream": true, "a": }',
        b'{"stream": true, 1: 2}',
        b'{"stream": true, "a"}',
        b'{"stream": true "a": 1}',
        b'{, "stream": true}',
        b'{"stream": true, "a": [1 2]}',
        b'{"stream": true, "a": [,1]}',
        b'{"stream": true, "a": {"b": 1 "c": 2}}',
        b"{\"stream\": true, 'a': 1}",
        b'{"stream": true, "stream_options": {"x": 1',
        b'{"stream": true, "stream_options": {"x": }}',
        b'x{"stream": true}',
        b"\xef\xbb\xbf{}",
        b"]",
        b":",
        b'"unterminated',
    ],
)
def test_malformed_body_passes_through_unchanged(body: bytes) -> None:
    out, inspector = scan(body, inject_usage=True)
    assert out == body
    assert not inspector.well_formed and not inspector.usage_injected and not inspector.modified


def test_nesting_is_limited_like_orjson() -> None:
    deepest = b'{"a": ' + b"[" * 1023 + b"]" * 1023 + b', "stream": true}'
    out, inspector = feed_all(
        [deepest[i : i + 7] for i in range(0, len(deepest), 7)], inject_usage=True
    )
    assert inspector.well_formed and orjson.loads(out)["stream_options"] == {"include_usage": True}
    too_deep = b'{"a": ' + b"[" * 1024 + b"]" * 1024 + b', "stream": true}'
    out, inspector = feed_all([too_deep], inject_usage=True)
    assert out == too_deep and not inspector.well_formed


def test_empty_chunks_change_nothing() -> None:
    inspector = BodyInspector(inject_usage=True)
    parts = [
        inspector.feed(b""),
        inspector.feed(b'{"stream":'),
        inspector.feed(b""),
        inspector.feed(b"true}"),
    ]
    assert parts == [b"", b'{"stream":', b"", b"true"]
    assert inspector.finish() == TAIL + b"}"


# injection


def test_stream_without_options_gets_options_before_the_final_brace() -> None:
    body = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi }"}], "stream": true}'
    out, inspector = injected(body)
    assert out == body[:-1] + TAIL + b"}"
    assert orjson.loads(out) == {**orjson.loads(body), "stream_options": {"include_usage": True}}
    assert inspector.usage_injected and inspector.modified and inspector.well_formed


def test_tail_injection_keeps_whitespace_around_the_final_brace() -> None:
    body = b'{\n  "stream": true,\n  "n": 1\n}\r\n\t '
    out, inspector = injected(body)
    assert out == b'{\n  "stream": true,\n  "n": 1\n' + TAIL + b"}\r\n\t "
    assert inspector.usage_injected
    assert orjson.loads(out) == {"stream": True, "n": 1, "stream_options": {"include_usage": True}}


def test_only_the_final_brace_and_what_follows_are_held_back() -> None:
    inspector = BodyInspector(inject_usage=True)
    assert inspector.feed(b'{"stream": true, "a": {"b": 1}') == b'{"stream": true, "a": {"b": 1}'
    assert inspector.feed(b" }  ") == b" "
    assert inspector.feed(b"\n") == b""
    assert inspector.finish() == TAIL + b"}  \n"


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (b"{}", b'{"include_usage":true}'),
        (b"{ \n }", b'{"include_usage":true \n }'),
        (b'{"x": 1}', b'{"include_usage":true,"x": 1}'),
        (
            b'{ "x": {"include_usage": false} }',
            b'{"include_usage":true, "x": {"include_usage": false} }',
        ),
    ],
)
def test_options_without_include_usage_get_it_first(options: bytes, expected: bytes) -> None:
    body = b'{"stream": true, "stream_options": ' + options + b', "n": 2}'
    out, inspector = injected(body)
    assert out == body.replace(options, expected)
    parsed = orjson.loads(out)
    assert parsed == {
        **orjson.loads(body),
        "stream_options": {**orjson.loads(options), "include_usage": True},
    }
    assert inspector.usage_injected and inspector.well_formed


def test_options_before_stream_are_held_only_until_they_close() -> None:
    inspector = BodyInspector(inject_usage=True)
    assert inspector.feed(b'{"stream_options": {"a"') == b'{"stream_options": '
    assert inspector.feed(b": 1}") == b'{"include_usage":true,"a": 1}'
    assert inspector.feed(b', "stream": true}') == b', "stream": true}'
    assert inspector.finish() == b""
    assert inspector.usage_injected


def test_escaped_options_keys_are_recognised() -> None:
    out, inspector = injected(b'{"stream_opti\\u006fns": {"a": 1}, "stream": true}')
    assert orjson.loads(out)["stream_options"] == {"include_usage": True, "a": 1}
    body = b'{"stream_options": {"include_\\u0075sage": false}, "stream": true}'
    out, inspector = injected(body)
    assert out == body and not inspector.usage_injected


@pytest.mark.parametrize(
    "options",
    [
        b'{"include_usage": true}',
        b'{"include_usage": false}',
        b'{"include_usage": null, "include_usage": false}',
        b'{"include_\\u0075sage": null}',
        b'{"include_usage": null, "a": {"b": 1}}',
        b'{"include_usage": null, "a": "include_usage"}',
        b"[]",
        b'"x"',
        b"true",
        b"0",
        b'{"include_usage": true}, "stream_options": {}',
        b'{"include_usage": true}, "stream_options": null',
    ],
)
def test_client_choice_about_usage_is_left_alone(options: bytes) -> None:
    body = b'{"stream": true, "stream_options": ' + options + b"}"
    out, inspector = injected(body)
    assert not inspector.usage_injected and inspector.well_formed and inspector.stream
    if not inspector.modified:
        assert out == body
    else:
        # An earlier object got its insertion before a later occurrence ruled injection out.
        assert out == body.replace(b"{}", b'{"include_usage":true}', 1)


@pytest.mark.parametrize(
    "body",
    [
        b'{"stream": true, "stream_options": null}',
        b'{"stream": true, "stream_options" :\n null \t, "n": 1}',
        b'{"stream_options": null, "n": [1, {"a": null}], "stream": true}',
        b'{"stream_options": null, "stream": false, "stream": true}',
    ],
)
def test_null_options_are_the_default_and_get_usage_in_their_place(body: bytes) -> None:
    # The OpenAI API reads stream_options null as absent: the proxy asks for usage as it does
    # when they are absent, in place of the null (a second key could be read either way).
    out, inspector = injected(body)
    start = body.index(b"null")
    assert out == body[:start] + FOR_NULL + body[start + 4 :]
    assert orjson.loads(out) == {**orjson.loads(body), "stream_options": {"include_usage": True}}
    assert inspector.usage_injected and inspector.modified and inspector.well_formed


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (b'{"include_usage": null}', b'{"include_usage": true}'),
        (b'{"a": [1], "include_usage" :null}', b'{"a": [1], "include_usage" :true}'),
        (
            b'{"include_usage": null, "include_usage": null}',
            b'{"include_usage": true, "include_usage": true}',
        ),
    ],
)
def test_include_usage_null_is_the_default_and_set_to_true(options: bytes, expected: bytes) -> None:
    body = b'{"stream": true, "stream_options": ' + options + b', "n": 2}'
    out, inspector = injected(body)
    assert out == body.replace(options, expected)
    assert inspector.usage_injected and inspector.modified and inspector.well_formed


def test_null_options_before_stream_are_held_until_a_stream_shows() -> None:
    inspector = BodyInspector(inject_usage=True)
    assert inspector.feed(b'{"stream_options": nu') == b'{"stream_options":'
    assert inspector.feed(b'll, "model": "m", ') == b""
    assert inspector.feed(b'"stream": true, "n": 1}') == (
        b' {"include_usage":true}, "model": "m", "stream": true, "n": 1}'
    )
    assert inspector.finish() == b""
    assert inspector.usage_injected


@pytest.mark.parametrize(
    "body",
    [
        b'{"stream_options": null, "stream": false}',
        b'{"stream_options": null, "n": 1}',
        b'{"stream_options": null, "stream_options": {}, "stream": true}',
        b'{"stream_options": null, "stream_options": null, "stream": true}',
        b'{"stream_options": null, "stream": true',
    ],
)
def test_null_options_of_a_body_that_does_not_stream_go_unchanged(body: bytes) -> None:
    # (Repeated before the body streams: which one the upstream keeps is its own choice.)
    out, inspector = injected(body)
    assert out == body and not inspector.usage_injected and not inspector.modified


def test_null_options_padded_past_the_hold_limit_go_unchanged() -> None:
    body = b'{"stream_options":' + b" " * OPTIONS_HOLD_LIMIT + b'null, "stream": true}'
    out, inspector = feed_all([body[:1000], body[1000:]], inject_usage=True)
    assert out == body and not inspector.usage_injected and inspector.well_formed


def deferring(chunks: Sequence[bytes], **options: Any) -> tuple[bytes, BodyInspector]:
    """What a caller that holds a deferred null (as usage_asked.py does) sends upstream."""
    inspector = BodyInspector(inject_usage=True, defer_null=True, **options)
    out = bytearray()
    fed = 0
    for chunk in chunks:
        out += inspector.feed(chunk)
        fed += len(chunk)
        # The inspector itself holds no more than its limit, whatever it defers.
        assert fed - len(out) <= OPTIONS_HOLD_LIMIT
    out += inspector.finish()
    assert not inspector.null_pending
    return inspector.replace_deferred_null(bytes(out)), inspector


def some_chunkings(body: bytes, around: Sequence[int]) -> Iterator[list[bytes]]:
    """The body whole, in sizes a socket reads, byte by byte, and cut at and near the offsets."""
    yield [body]
    for size in (1, 1000, 4096, 65_536, 65_537):
        yield [body[i : i + size] for i in range(0, len(body), size)]
    for at in around:
        for cut in range(max(at - 3, 0), min(at + 4, len(body) + 1)):
            yield [body[:cut], body[cut:]]


LATE = b'{"stream_options" : null ,"model":"m","messages":[{"content":"%s"}],"stream":%s}'


@pytest.mark.parametrize("padding", [OPTIONS_HOLD_LIMIT - 64, OPTIONS_HOLD_LIMIT, 300_000])
def test_null_options_get_usage_in_their_place_however_late_the_stream_true(padding: int) -> None:
    # A client that sends stream_options null first and "stream": true after megabytes of
    # images: past the hold limit the null went unchanged, and a tpm or budget token refused it.
    body = LATE % (b"x" * padding, b"true")
    null = body.index(b"null")
    expected = body[:null] + FOR_NULL + body[null + 4 :]
    marks = (null, null + 4, body.index(b"true"), len(body) - 1, OPTIONS_HOLD_LIMIT)
    for chunks in some_chunkings(body, marks):
        out, inspector = deferring(chunks, watch=frozenset({"model"}))
        assert out == expected, [len(chunk) for chunk in chunks]
        assert inspector.usage_injected and inspector.modified and inspector.well_formed
        assert inspector.values == {"model": ["m"]}


@pytest.mark.parametrize(
    "tail",
    [
        b'"stream":false}',
        b'"n":1}',
        b'"stream_options":null,"stream":true}',
        b'"stream_options":{},"stream":true}',
        b'"stream":true',
    ],
)
def test_null_options_past_the_hold_limit_of_a_body_that_does_not_stream_go_unchanged(
    tail: bytes,
) -> None:
    # (The API refuses stream_options on a request that does not stream; repeated, which one
    # an upstream keeps is its own choice.)
    body = b'{"stream_options":null,"messages":"%s",%s' % (b"x" * 100_000, tail)
    for chunks in some_chunkings(body, (body.index(b"null"), len(body) - len(tail))):
        out, inspector = deferring(chunks)
        assert out == body and not inspector.usage_injected and not inspector.null_replaced


def test_null_options_past_the_hold_limit_are_replaced_only_for_a_caller_that_holds_them() -> None:
    body = LATE % (b"x" * 100_000, b"true")
    out, inspector = feed_all([body[:1000], body[1000:]], inject_usage=True)
    assert out == body and not inspector.usage_injected and inspector.null_at == -1


@pytest.mark.parametrize(
    "body",
    [
        b'{"stream":true,"stream_options":null' + b" " * OPTIONS_HOLD_LIMIT + b',"n":1}',
        b'{"stream_options":' + b" " * OPTIONS_HOLD_LIMIT + b'null,"stream":true}',
    ],
)
def test_null_options_padded_past_the_hold_limit_go_unchanged_even_to_a_caller_that_holds_them(
    body: bytes,
) -> None:
    # (Until the member ends a null is not known to be one in every chunking: no deferring it.)
    null = body.index(b"null")
    for chunks in some_chunkings(body, (null, null + 4)):
        out, inspector = deferring(chunks)
        assert out == body and not inspector.usage_injected


def test_every_options_object_without_include_usage_gets_it() -> None:
    body = b'{"stream_options": {}, "stream": true, "stream_options": {"a": 1}}'
    out, inspector = injected(body)
    assert (
        out
        == b'{"stream_options": {"include_usage":true}, "stream": true, "stream_options": {"include_usage":true,"a": 1}}'
    )
    assert inspector.usage_injected


def test_options_get_usage_even_when_stream_turns_out_false_and_say_so() -> None:
    body = b'{"stream_options": {"a": 1}, "stream": false}'
    out, inspector = injected(body)
    assert out == b'{"stream_options": {"include_usage":true,"a": 1}, "stream": false}'
    assert inspector.modified and not inspector.usage_injected


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "x"}',
        b'{"stream": false}',
        b'{"stream": "true"}',
        b'{"stream": true, "stream": false}',
        b'{"messages": [{"stream": true}]}',
        b'{"stream_options": null}',
    ],
)
def test_body_that_does_not_stream_is_forwarded_unchanged(body: bytes) -> None:
    out, inspector = injected(body)
    assert out == body and not inspector.usage_injected and not inspector.modified


def test_nested_options_decoys_are_left_alone() -> None:
    body = (
        b'{"messages": [{"stream_options": {}, "content": "\\"stream_options\\": {}"}],'
        b' "x": "stream_options", "meta": {"stream_options": {}}, "stream": true}'
    )
    out, inspector = injected(body)
    assert out == body[:-1] + TAIL + b"}"
    assert inspector.usage_injected


def test_nothing_is_injected_unless_asked() -> None:
    body = b'{"stream": true, "stream_options": {}}'
    out, inspector = scan(body)
    assert out == body and not inspector.usage_injected and not inspector.modified


def test_oversized_options_object_is_released_and_not_injected() -> None:
    filler = b'"' + b"x" * OPTIONS_HOLD_LIMIT + b'"'
    head = b'{"stream": true, "stream_options": {"pad": '
    body = head + filler + b"}}"
    inspector = BodyInspector(inject_usage=True)
    sent = b""
    for start in range(0, len(body), 4096):
        sent += inspector.feed(body[start : start + 4096])
        # Once the hold passes the limit, output catches up with input (bar the final brace).
        if start + 4096 > len(head) + OPTIONS_HOLD_LIMIT + 4096:
            assert len(sent) >= start
    sent += inspector.finish()
    assert sent == body and not inspector.usage_injected and inspector.well_formed
    out, inspector = feed_all([body], inject_usage=True)
    assert out == body and not inspector.usage_injected


def test_oversized_trailer_is_released_and_not_injected() -> None:
    body = b'{"stream": true}' + b" " * (OPTIONS_HOLD_LIMIT + 1)
    out, inspector = feed_all([body[:10], body[10:]], inject_usage=True)
    assert out == body and not inspector.usage_injected and inspector.well_formed


def test_flaw_after_options_closed_leaves_the_insertion_and_says_modified() -> None:
    body = b'{"stream_options": {}, "stream": true'
    out, inspector = injected(body)
    assert out == b'{"stream_options": {"include_usage":true}, "stream": true'
    assert inspector.modified and not inspector.well_formed and not inspector.usage_injected


# chunk boundaries


@pytest.mark.parametrize(
    "body",
    [
        b'{"mod\\u0065l": "caf\\u00e9 \\ud83d\\ude00", "str\\u0065am": true}',
        b'{"model": "a\\\\\\"b\\\\", "stream" :  true  }',
        b'{"model": -12.5e+10, "stream": true, "stream_options": {"a": [1, {"b": "}"}]}}',
        b'{"model": [true, false, null], "stream":true,"stream_options":{}}',
    ],
)
def test_any_chunk_boundary_gives_the_same_result(body: bytes) -> None:
    # scan() itself cuts everywhere, including inside escapes, keys and literals.
    out, inspector = scan(body, watch=frozenset({"model"}), inject_usage=True)
    assert inspector.usage_injected and inspector.well_formed
    assert orjson.loads(out)["stream_options"]["include_usage"] is True
    assert inspector.values["model"] == [orjson.loads(body)["model"]]


def test_raw_values_are_their_json_text_in_any_chunking_up_to_their_own_limit() -> None:
    body = b'{"tools": [{"type": "a", "type": "b"}], "model": "m", "tools" : "t\\u0031"}'
    values = watched(body, "model", raw=frozenset({"tools"}))
    assert values == {"model": ["m"], "tools": [b'[{"type": "a", "type": "b"}]', b'"t\\u0031"']}
    # The raw limit is the raw names' own: a watched value keeps the usual one.
    # (Small limits keep the body short: every chunking of it is scanned.)
    long = b'{"tools": [%s], "model": "%s"}' % (b"1," * 100 + b"1", b"m" * 100)
    limits = {"max_value_bytes": 64, "raw": frozenset({"tools"})}
    values = watched(long, "model", max_raw_bytes=256, **limits)
    assert values == {"model": [TOO_LARGE], "tools": [b"[" + b"1," * 100 + b"1]"]}
    values = watched(long, "model", max_raw_bytes=128, **limits)
    assert values["tools"] == [TOO_LARGE]


# properties

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)
WHITESPACE = ["", "", "", " ", "\n", "\t", "\r\n  "]


def render_string(text: str, rng: random.Random) -> bytes:
    """A JSON string with some characters written as \\u escapes."""
    out = []
    for char in text:
        if rng.random() < 0.2:
            code = ord(char)
            if code > 0xFFFF:
                code -= 0x10000
                out.append(f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04X}")
            else:
                out.append(f"\\u{code:04x}")
        else:
            out.append(orjson.dumps(char).decode()[1:-1])
    return ('"' + "".join(out) + '"').encode()


def render(value: object, rng: random.Random) -> bytes:
    """JSON text with random whitespace between tokens."""

    def ws() -> bytes:
        return rng.choice(WHITESPACE).encode()

    if isinstance(value, str):
        return render_string(value, rng)
    if isinstance(value, dict):
        members = [
            ws() + render_string(k, rng) + ws() + b":" + ws() + render(v, rng) + ws()
            for k, v in value.items()
        ]
        return b"{" + b",".join(members) + ws() + b"}"
    if isinstance(value, list):
        return b"[" + b",".join(ws() + render(v, rng) + ws() for v in value) + ws() + b"]"
    return orjson.dumps(value)


@st.composite
def bodies(draw: st.DrawFn) -> tuple[list[tuple[str, object]], bytes, list[bytes]]:
    """Top-level members (with duplicates), their rendering, and the raw text of each value."""
    members: list[tuple[str, object]] = list(
        draw(st.dictionaries(st.text(max_size=6), json_values, max_size=4)).items()
    )
    for key in ("model", "stream"):
        for _ in range(draw(st.integers(0, 2))):
            members.append((key, draw(st.sampled_from([True, False, "true", None]) | json_values)))
    options = draw(
        st.sampled_from([MISSING, None, [], {}, {"include_usage": False}, {"include_usage": True}])
        | st.dictionaries(st.text(max_size=6), json_values, max_size=3)
    )
    if options is not MISSING:
        members.append(("stream_options", options))
    members = draw(st.permutations(members))
    rng = draw(st.randoms(use_true_random=False))
    raws = [render(value, rng) for _, value in members]
    body = (
        b"{"
        + b",".join(
            rng.choice(WHITESPACE).encode()
            + render_string(key, rng)
            + b":"
            + rng.choice(WHITESPACE).encode()
            + raw
            + rng.choice(WHITESPACE).encode()
            for (key, _), raw in zip(members, raws, strict=True)
        )
        + b"}"
    )
    return members, body, raws


def spliced(out: bytes, body: bytes, insertion: bytes) -> bool:
    """Whether `out` is `body` with `insertion` put in at one place."""
    at = out.find(insertion)
    while at >= 0:
        if out[:at] + out[at + len(insertion) :] == body:
            return True
        at = out.find(insertion, at + 1)
    return False


def chunked(body: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(cut, len(body)) for cut in cuts})
    return [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    case=bodies(),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=12),
    limit=st.sampled_from([8, 64, 1 << 20]),
    inject=st.booleans(),
)
def test_generated_bodies_reassemble_decode_and_inject(
    case: tuple[list[tuple[str, object]], bytes, list[bytes]],
    cuts: list[int],
    limit: int,
    inject: bool,
) -> None:
    members, body, raws = case
    out, inspector = feed_all(
        chunked(body, cuts),
        watch=frozenset({"model", "stream"}),
        inject_usage=inject,
        max_value_bytes=limit,
    )
    assert inspector.well_formed and inspector.is_object
    for key in ("model", "stream"):
        expected = [
            TOO_LARGE if len(raw) > limit else value
            for (name, value), raw in zip(members, raws, strict=True)
            if name == key
        ]
        assert inspector.values[key] == expected
    final = dict(members)
    assert orjson.loads(body) == final
    stream = final.get("stream") is True
    assert inspector.stream is stream
    options = final.get("stream_options", MISSING)
    tail = stream and options is MISSING
    inside = isinstance(options, dict) and "include_usage" not in options
    # A null is replaced once a stream true is seen: the last before it, or any after it.
    null = False
    if options is None:
        at = [name for name, _ in members].index("stream_options")
        before = [value for name, value in members[:at] if name == "stream"][-1:]
        after = [value for name, value in members[at:] if name == "stream"]
        null = (before == [True] and before[0] is True) or any(value is True for value in after)
    if not inject or not (tail or inside or null):
        assert out == body and not inspector.modified and not inspector.usage_injected
        return
    assert inspector.modified and inspector.usage_injected is stream
    if null:
        assert any(
            out == body[:at] + FOR_NULL + body[at + 4 :]
            for at in range(len(body))
            if body.startswith(b"null", at)
        )
        assert orjson.loads(out) == {**final, "stream_options": {"include_usage": True}}
        return
    if tail:
        insertion, expected_options = TAIL, {}
    else:
        assert isinstance(options, dict)
        insertion = b'"include_usage":true,' if options else b'"include_usage":true'
        expected_options = options
    assert spliced(out, body, insertion)
    assert orjson.loads(out) == {
        **final,
        "stream_options": {**expected_options, "include_usage": True},
    }


PAD_KEY = b'"a long member"'


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    case=bodies(),
    where=st.integers(0, 8),
    null=st.booleans(),
    stream=st.sampled_from([b"", b"true", b"false"]),
    cuts=st.lists(st.integers(0, OPTIONS_HOLD_LIMIT + 4000), max_size=8),
)
def test_generated_bodies_with_a_long_member_are_sent_as_with_a_short_one(
    case: tuple[list[tuple[str, object]], bytes, list[bytes]],
    where: int,
    null: bool,
    stream: bytes,
    cuts: list[int],
) -> None:
    # Often a null stream_options just before the long member and a stream after it: the
    # shape that outgrows the hold.
    members, _, raws = case
    rendered = [orjson.dumps(key) + b":" + raw for (key, _), raw in zip(members, raws, strict=True)]
    where = min(where, len(rendered))
    before = [b'"stream_options":null'] if null else []
    after = [b'"stream":' + stream] if stream else []

    def body_with(pad: bytes) -> bytes:
        long_member = PAD_KEY + b':"' + pad + b'"'
        padded = [*rendered[:where], *before, long_member, *rendered[where:], *after]
        return b"{" + b",".join(padded) + b"}"

    long = b"A" * OPTIONS_HOLD_LIMIT
    watch = frozenset({"model", "stream"})
    short_out, short = feed_all([body_with(b"A")], inject_usage=True, watch=watch)
    out, inspector = deferring(chunked(body_with(long), cuts), watch=watch)
    assert out == short_out.replace(PAD_KEY + b':"A"', PAD_KEY + b':"' + long + b'"')
    assert inspector.usage_injected is short.usage_injected
    assert inspector.values == short.values


MUTATION_BYTES = b'{}[],:"\\ \n0123456789eE.-+tfnrulsax'


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    case=bodies(),
    edits=st.lists(
        st.tuples(
            st.sampled_from(["insert", "replace", "delete", "truncate"]),
            st.integers(0, 4000),
            st.sampled_from(list(MUTATION_BYTES)),
        ),
        min_size=1,
        max_size=3,
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=8),
    inject=st.booleans(),
)
def test_mutated_bodies_never_raise_and_pass_through_unless_well_formed(
    case: tuple[list[tuple[str, object]], bytes, list[bytes]],
    edits: list[tuple[str, int, int]],
    cuts: list[int],
    inject: bool,
) -> None:
    body = bytearray(case[1])
    for action, where, byte in edits:
        at = where % (len(body) + 1)
        if action == "insert":
            body[at:at] = bytes([byte])
        elif action == "replace" and at < len(body):
            body[at] = byte
        elif action == "delete":
            del body[at : at + 1]
        elif action == "truncate":
            del body[at:]
    data = bytes(body)
    out, inspector = feed_all(chunked(data, cuts), watch=frozenset({"model"}), inject_usage=inject)
    if not inspector.modified:
        assert out == data
    else:
        # A mutation may leave the body valid, and an options object that closed before a
        # later flaw keeps its insertion: either way exactly one insertion was spliced in.
        assert inject
        insertions = (TAIL, b'"include_usage":true,', b'"include_usage":true')
        assert any(spliced(out, data, insertion) for insertion in insertions) or any(
            out == data[:at] + FOR_NULL + data[at + 4 :]
            for at in range(len(data))
            if data.startswith(b"null", at)
        )
    try:
        orjson.loads(data)
    except orjson.JSONDecodeError as error:
        # What stays upstream's to refuse: encodings the inspector does not validate.
        assert not inspector.well_formed or re.search("UTF-8|surrogate|infinity", str(error))
    else:
        assert inspector.well_formed
        assert inspector.is_object is data.lstrip(b" \t\r\n").startswith(b"{")


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"model":"m","messages":[]}', None),
        (b'{"model":"m","stream":false}', None),
        (b'{"stream":"true"}', None),
        (b'["stream", true]', None),
        (b'{"stream": tru', None),
        (b'{"stream":true,"stream_options":{"include_usage":false}}', None),
        (
            b'{"stream":true,"stream_options":null}',
            b'{"stream":true,"stream_options":' + FOR_NULL + b"}",
        ),
        (
            b'{"stream_options" : null,"stream":true}',
            b'{"stream_options" : ' + FOR_NULL + b',"stream":true}',
        ),
        (b'{"stream":false,"stream_options":null}', None),
        # Spelled twice: the inspector decides.
        (
            b'{"stream":true,"stream_options":null,"m":"stream_options"}',
            b'{"stream":true,"stream_options":' + FOR_NULL + b',"m":"stream_options"}',
        ),
        (b'{"stream":true,"stream_options":{"include_usage":true}}', None),
        (
            b'{"stream":true,"stream_options":{"include_usage":null,"x":1}}',
            b'{"stream":true,"stream_options":{"include_usage":true,"x":1}}',
        ),
        # Spelled twice, or once escaped: the inspector decides (orjson alone reads the last).
        (
            b'{"stream":true,"stream_options":{"x":1},'
            b'"\\u0073tream_options":{"include_usage":true}}',
            None,
        ),
        (b'{"stream":true,"stream_options":{"include_usage":true},"stream_options":{"x":1}}', None),
        (
            b'{"stream":true,"stream_options":{"x":1},"m":"\\"include_usage\\""}',
            b'{"stream":true,"stream_options":{"include_usage":true,"x":1},"m":"\\"include_usage\\""}',
        ),
        (
            b'{"model":"m","stream":true}  ',
            b'{"model":"m","stream":true,"stream_options":{"include_usage":true}}  ',
        ),
        (
            b'{"\\u0073tream":true}',
            b'{"\\u0073tream":true,"stream_options":{"include_usage":true}}',
        ),
        (
            b'{"stream":true,"stream_options":{"x":1}}',
            b'{"stream":true,"stream_options":{"include_usage":true,"x":1}}',
        ),
    ],
)
def test_ask_usage_on_a_whole_small_body(body: bytes, expected: bytes | None) -> None:
    assert ask_usage(body) == expected


# Pieces that make or break a string body: long plain runs (across the scanner's windows of 1 KiB,
# then 8 and 64 KiB), escapes whole and cut, stray backslashes, quotes and control characters.
STRING_PIECES = st.one_of(
    st.integers(min_value=1, max_value=20_000).map(lambda n: b"A" * n),
    st.sampled_from(
        [b'\\"', b"\\\\", b"\\n", b"\\u00e9", b"\\u00", b"\\", b"\\x", b'"', b"\x00", b"\x1f",
         b"\xc3\xa9", b"\x7f", b" "]
    ),
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(pieces=st.lists(STRING_PIECES, max_size=12), start=st.integers(min_value=0, max_value=64))
def test_a_string_body_ends_where_the_json_grammar_ends_it(pieces: list[bytes], start: int) -> None:
    chunk = b"".join(pieces)
    start = min(start, len(chunk))
    grammar = re.compile(_STRING_BODY).match(chunk, start)
    assert grammar is not None  # the pattern matches the empty string
    assert _string_body_end(chunk, start) == grammar.end()


@pytest.mark.parametrize("chunk_size", [1000, 1024, 65_536, 262_144])
@pytest.mark.parametrize(
    ("flaw", "well_formed"),
    [(b"", True), (b"\\n\\u00e9\\\\", True), (b"\x01", False), (b"\\q", False)],
)
def test_a_long_image_string_read_in_chunks_is_checked_to_its_end(
    chunk_size: int, flaw: bytes, well_formed: bool
) -> None:
    # A vision request: megabytes of base64 in one string, arriving in socket-sized chunks, with
    # a flaw (or escapes) past the first windows of every chunk.
    image = b"QUJD" * 300_000
    at = 1_000_003
    body = (
        b'{"model":"m","stream":true,"messages":[{"role":"user","content":[{"type":"image_url",'
        b'"image_url":{"url":"data:image/png;base64,' + image[:at] + flaw + image[at:] + b'"}}]}]}'
    )
    chunks = [body[i : i + chunk_size] for i in range(0, len(body), chunk_size)]
    out, inspector = feed_all(chunks, watch=frozenset({"model"}), inject_usage=True)
    assert inspector.well_formed is well_formed
    if well_formed:
        assert inspector.values["model"] == ["m"]
        assert out == body[:-1] + b',"stream_options":{"include_usage":true}}'
    else:
        assert out == body and not inspector.modified


@pytest.mark.parametrize("boundary", [1024, 1024 + 8192, 1024 + 8192 + 65_536])
@pytest.mark.parametrize("escape", [b'\\"', b"\\u0022", b"\\\\"])
@pytest.mark.parametrize("shift", [-5, -1, 0])
def test_an_escape_across_a_scan_window_is_read_whole(
    boundary: int, escape: bytes, shift: int
) -> None:
    # The escaped quote must not be taken for the end of the string where a window ends inside it.
    text = b"A" * (boundary + shift) + escape + b"B" * 10
    chunk = text + b'"' + b"C" * 300_000
    assert _string_body_end(chunk, 0) == len(text)
