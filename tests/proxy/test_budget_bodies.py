"""Budgeted tokens over raw HTTP/1.1, against the real server and the recording fake upstream.

A budgeted request's body is read whole, priced and held for before it goes upstream, with the
output cap its hold affords written in when it set none. Whatever the body's size, framing or
shape, the upstream receives exactly the JSON the client sent plus that cap, framed by a correct
``Content-Length``, or it receives nothing; and a request refused or abandoned on the way holds
nothing of the budget.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import itertools
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest

from llm_proxy.proxy.cost_bound import CAP_FIELDS
from tests.conftest import Proxy
from tests.fakes import Seen
from tests.http.answers import Answers
from tests.http.test_front import read_response, request
from tests.proxy import test_budgets
from tests.proxy.test_budgets import INPUT_NANOUSD, OUTPUT_NANOUSD, settled

# The budget tests' fixtures: the same upstream (200-token answers), prices and budgeted proxy.
upstream_server = test_budgets.upstream_server
prices_path = test_budgets.prices_path
budgeted = test_budgets.budgeted

CHAT = "/v1/chat/completions"
Answer = tuple[int, dict[str, str], bytes]
# The error type of each status the proxy's own refusals here carry.
TYPES = {
    400: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
}


# -- speaking HTTP/1.1 -------------------------------------------------------------------------


def with_length(path: str, token: str, body: bytes, **fields: str) -> bytes:
    return request("POST", path, token, body, Content_Type="application/json", **fields)


def chunked(path: str, token: str, body: bytes, **fields: str) -> bytes:
    """``body`` chunked as no client library would: sizes from 1 byte to a megabyte, upper- and
    lower-case hex with leading zeros, chunk extensions (quoted ones too), and a trailer."""
    framing = {"Content_Type": "application/json", "Transfer_Encoding": "chunked", **fields}
    head = request("POST", path, token, b"", **framing)
    out = bytearray(head)
    sizes = itertools.cycle([1, 7, 4093, 65_537, 1_000_003, 13, 2])
    pos = 0
    for n in itertools.count():
        if pos >= len(body):
            break
        piece = body[pos : pos + next(sizes)]
        pos += len(piece)
        size = b"%04X" % len(piece) if n % 2 else b"%x" % len(piece)
        extension = [b"", b";ext", b';name="quoted value"', b";a=1;b=2"][n % 4]
        out += size + extension + b"\r\n" + piece + b"\r\n"
    out += b"0;done\r\nX-Trailer: ignored\r\n\r\n"
    return bytes(out)


FRAMINGS = {"content-length": with_length, "chunked": chunked}


async def exchange(proxy: Proxy, data: bytes) -> Answer:
    """Send ``data`` on a connection of its own and read the one answer (given time: pricing
    megabytes of prompt takes seconds under coverage)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.client.port)
    answers = Answers()
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(30):
            while not answers.items:
                received = await reader.read(65536)
                assert received, "the connection closed without an answer"
                answers.feed(received)
    finally:
        writer.close()
    answer = answers.items[0]
    return answer["status"], answer["headers"], answer["body"]


def refused(answer: Answer, status: int, code: str) -> str:
    """Assert an answer is the proxy's own refusal in the documented shape; its message."""
    got, headers, body = answer
    assert got == status, body[:500]
    assert headers["content-type"] == "application/json"
    error = orjson.loads(body)["error"]
    assert set(error) == {"message", "type", "code"}
    assert (error["code"], error["type"]) == (code, TYPES[status])
    return str(error["message"])


# -- budgets -----------------------------------------------------------------------------------


def nanousd(dollars: str | float) -> int:
    return int(Decimal(str(dollars)) * 10**9)


def held(headers: dict[str, str], budget_usd: float) -> int:
    """What the request holds, in nano-dollars: the budget less what the answer says is left."""
    return nanousd(budget_usd) - nanousd(headers["llm-proxy-remaining-budget-usd"])


async def holds_nothing(proxy: Proxy, token_id: str) -> None:
    shown = await settled(proxy, token_id)
    assert (shown["reserved_usd"], shown["spent_usd"]) == (0, 0)


async def still_serves(proxy: Proxy, token: str) -> int:
    """A plain budgeted request on a new connection is answered and forwarded; what it costs, in
    nano-dollars."""
    body = orjson.dumps({"model": "budget-mini", "messages": [{"role": "user", "content": "hi"}]})
    status, _, answer = await exchange(proxy, with_length(CHAT, token, body))
    assert status == 200, answer
    assert proxy.upstream.last.body == body
    used = orjson.loads(answer)["usage"]
    return int(used["prompt_tokens"] * INPUT_NANOUSD + used["completion_tokens"] * OUTPUT_NANOUSD)


def framed_whole(sent: Seen) -> None:
    """The upstream got its body with a Content-Length that frames it, and no chunked framing."""
    names = {name.lower() for name in sent.headers}
    assert "transfer-encoding" not in names
    assert int(sent.headers["Content-Length"]) == len(sent.body)


def caps_any_parser_reads(body: bytes) -> list[object]:
    """The output caps a body names, as a parser keeping the first of a repeated key reads it and
    as one keeping the last does (Python's json, orjson)."""
    first: dict[str, Any] = json.loads(body, object_pairs_hook=lambda pairs: dict(pairs[::-1]))
    last: dict[str, Any] = json.loads(body)
    return [parsed[field] for parsed in (first, last) for field in CAP_FIELDS if field in parsed]


# -- bodies ------------------------------------------------------------------------------------


def big_chat(kind: str) -> bytes:
    """Some 8 MB of chat: prose, or a base64 image as a data URL, as the SDKs send them."""
    content: Any
    if kind == "text":
        content = "word " * (8 * 1024 * 1024 // 5)
    else:
        image = base64.b64encode(bytes(range(256)) * (6 * 4096)).decode()
        content = [
            {"type": "text", "text": "What is in this picture?"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
        ]
    body: dict[str, Any] = {"messages": [{"role": "user", "content": content}]}
    body["model"] = "uncapped-model"  # no cap of its own: the proxy always writes one
    if kind == "image":
        body["stream"] = True
    return orjson.dumps(body)


def chat_of_size(size: int) -> bytes:
    """A chat body of exactly ``size`` bytes."""
    shell = orjson.dumps({"model": "budget-mini", "messages": [{"role": "user", "content": ""}]})
    pad = size - len(shell)
    text = "a " * (pad // 2) + "a" * (pad % 2)
    return shell.replace(b'"content":""', b'"content":"' + text.encode() + b'"')


def small_chat(**fields: Any) -> bytes:
    return orjson.dumps(
        {"model": "budget-mini", "messages": [{"role": "user", "content": "hello there"}], **fields}
    )


# -- a large body goes upstream whole, with the cap and nothing else added ---------------------


@pytest.mark.parametrize("framing", FRAMINGS)
@pytest.mark.parametrize("kind", ["text", "image"])
async def test_a_multi_megabyte_body_reaches_the_upstream_as_sent_plus_its_cap(
    budgeted: Proxy, framing: str, kind: str
) -> None:
    issued = await budgeted.issue_token(budget_usd=5)
    body = big_chat(kind)
    assert len(body) > 8_000_000
    status, headers, answer = await exchange(
        budgeted, FRAMINGS[framing](CHAT, issued["token"], body)
    )
    assert status == 200, answer[:500]
    (sent,) = budgeted.upstream.requests
    framed_whole(sent)
    forwarded = orjson.loads(sent.body)
    cap = forwarded.pop("max_completion_tokens")
    if kind == "image":  # a stream: asked for its usage, so that it can be settled
        assert forwarded.pop("stream_options") == {"include_usage": True}
        assert answer.rstrip().endswith(b"data: [DONE]")
    else:
        assert orjson.loads(answer)["usage"]["completion_tokens"] == 200
    assert forwarded == orjson.loads(body)
    assert body[1:-1] in sent.body  # every byte of the client's JSON, in order
    # The cap is what the hold affords: its output at the output price fits in the hold.
    assert cap >= 16 and cap * OUTPUT_NANOUSD <= held(headers, 5)
    shown = await settled(budgeted, issued["id"], spent_at_least=0.000001)
    assert 0 < shown["spent_usd"] <= 5


async def test_a_responses_body_gets_max_output_tokens_and_stops_there(budgeted: Proxy) -> None:
    issued = await budgeted.issue_token(budget_usd=0.0005)
    # Whitespace around the object, chunked: the cap still goes inside it.
    body = b' \r\n{"model": "budget-mini", "input": "hello there"}\n'
    status, headers, answer = await exchange(
        budgeted, chunked("/v1/responses", issued["token"], body)
    )
    assert status == 200, answer
    sent = budgeted.upstream.last
    framed_whole(sent)
    forwarded = orjson.loads(sent.body)
    cap = forwarded.pop("max_output_tokens")
    assert forwarded == orjson.loads(body)
    assert 16 <= cap < 200  # the budget affords less than the model's own 200
    response = orjson.loads(answer)
    assert response["usage"]["output_tokens"] == cap and response["status"] == "incomplete"
    prompt = response["usage"]["input_tokens"]
    assert prompt * INPUT_NANOUSD + cap * OUTPUT_NANOUSD <= held(headers, 0.0005)
    shown = await settled(budgeted, issued["id"], spent_at_least=0.000001)
    assert shown["spent_usd"] == pytest.approx(
        (prompt * INPUT_NANOUSD + cap * OUTPUT_NANOUSD) / 1e9
    )


async def test_an_embeddings_body_goes_upstream_unchanged_and_pays_its_input(
    budgeted: Proxy,
) -> None:
    issued = await budgeted.issue_token(budget_usd=1)
    body = orjson.dumps({"model": "embed-model", "input": "token " * 400_000})
    status, headers, answer = await exchange(
        budgeted, chunked("/v1/embeddings", issued["token"], body)
    )
    assert status == 200, answer[:500]
    sent = budgeted.upstream.last
    framed_whole(sent)
    assert sent.body == body  # no output, so no cap: byte for byte
    prompt = orjson.loads(answer)["usage"]["prompt_tokens"]
    assert 0 < prompt * INPUT_NANOUSD // 2 <= held(headers, 1)
    shown = await settled(budgeted, issued["id"], spent_at_least=0.000001)
    assert shown["spent_usd"] == pytest.approx(prompt * INPUT_NANOUSD / 2 / 1e9)


# -- bodies that never reach the upstream hold nothing -----------------------------------------


@pytest.mark.parametrize("framing", FRAMINGS)
async def test_a_body_over_the_limit_is_413_and_holds_nothing(
    proxy_factory: Any, prices_path: Path, framing: str
) -> None:
    proxy: Proxy = await proxy_factory(prices_path=prices_path, max_request_body_bytes=1_000_000)
    issued = await proxy.issue_token(budget_usd=5)
    send = FRAMINGS[framing]
    for size in (1_000_001, 3_000_000):
        answer = await exchange(proxy, send(CHAT, issued["token"], chat_of_size(size)))
        assert "1000000 bytes" in refused(answer, 413, "request_too_large")
    assert proxy.upstream.requests == []
    await holds_nothing(proxy, issued["id"])
    # One byte less is within the limit: priced, held and forwarded whole.
    body = chat_of_size(1_000_000)
    status, _, answer_body = await exchange(proxy, send(CHAT, issued["token"], body))
    assert status == 200, answer_body
    (sent,) = proxy.upstream.requests
    assert sent.body == body  # (affordable beyond the model's own cap: nothing to add)
    framed_whole(sent)


@pytest.mark.parametrize("size", [2_000, 2_000_000], ids=["read-whole", "streamed"])
@pytest.mark.parametrize("how", ["half-close", "reset"])
async def test_a_client_that_sends_less_than_its_content_length_and_leaves_holds_nothing(
    budgeted: Proxy, size: int, how: str
) -> None:
    issued = await budgeted.issue_token(budget_usd=5)
    whole = with_length(CHAT, issued["token"], chat_of_size(size))
    reader, writer = await asyncio.open_connection("127.0.0.1", budgeted.client.port)
    writer.write(whole[: -size // 2])
    await writer.drain()
    if how == "half-close":
        writer.write_eof()
        # The server closes without an answer: there is no whole request to answer.
        assert await asyncio.wait_for(reader.read(), 5) == b""
        await holds_nothing(budgeted, issued["id"])
    else:
        writer.transport.abort()  # a reset: nothing to wait for
    writer.close()
    # The next request, on a connection of its own, is answered at once.
    cost = await still_serves(budgeted, issued["token"])
    assert len(budgeted.upstream.requests) == 1
    shown = await settled(budgeted, issued["id"], spent_at_least=cost / 1e9)
    assert shown["spent_usd"] == pytest.approx(cost / 1e9)  # that request's alone


async def test_a_request_cancelled_while_its_token_loads_fails_no_other_one(
    budgeted: Proxy,
) -> None:
    # Requests for a token not cached yet share one load from the store. The first one's client
    # leaving (as the reset above does) used to fail the others with its CancelledError: they
    # ended unanswered, their connections left open.
    issued = await budgeted.issue_token(budget_usd=5)
    authority = budgeted.components.authority
    credential = f"Bearer {issued['token']}"
    first = asyncio.ensure_future(authority.check(credential))
    await asyncio.sleep(0)  # the first request starts loading the token
    second = asyncio.ensure_future(authority.check(credential))
    await asyncio.sleep(0)  # the second one waits for that load
    first.cancel()
    assert (await asyncio.wait_for(second, 5)).token_id == issued["id"]
    with pytest.raises(asyncio.CancelledError):
        await first


@pytest.mark.parametrize(
    ("framing", "size"),
    [("content-length", 2_000), ("content-length", 2_000_000), ("chunked", 2_000_000)],
    ids=["read-whole", "streamed", "chunked"],
)
async def test_a_body_that_stops_arriving_is_408_and_holds_nothing(
    proxy_factory: Any, prices_path: Path, framing: str, size: int
) -> None:
    proxy: Proxy = await proxy_factory(prices_path=prices_path, site={"body_seconds": 0.3})
    issued = await proxy.issue_token(budget_usd=5)
    whole = FRAMINGS[framing](CHAT, issued["token"], chat_of_size(size))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.client.port)
    writer.write(whole[: len(whole) // 2])  # and then nothing, the connection left open
    answer = await read_response(reader)
    refused(answer, 408, "request_timeout")
    assert answer[1]["connection"] == "close"
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    assert proxy.upstream.requests == []
    await holds_nothing(proxy, issued["id"])
    await still_serves(proxy, issued["token"])


UNPRICEABLE = {
    "truncated JSON": (b'{"model": "budget-mini", "messages": [{"role": "user"', "bad_request"),
    "two values": (b'{"model": "budget-mini", "messages": []} {"model": "x"}', "bad_request"),
    "trailing comma": (b'{"model": "budget-mini", "messages": [],}', "bad_request"),
    "a lone surrogate": (b'{"model": "budget-mini\\ud800", "messages": []}', "bad_request"),
    "an array": (b'[{"model": "budget-mini", "messages": []}]', "model_not_priced"),
    "a string": (b'"budget-mini"', "model_not_priced"),
    "a numeric model": (b'{"model": 42, "messages": []}', "model_not_priced"),
    "a null model": (b'{"model": null, "messages": []}', "model_not_priced"),
    "a list of models": (b'{"model": ["budget-mini"], "messages": []}', "model_not_priced"),
    "no model": (b'{"messages": [{"role": "user", "content": "hi"}]}', "model_not_priced"),
    "a repeated model": (
        b'{"model": "budget-mini", "messages": [], "model": "gpt-unknown"}',
        "model_not_priced",
    ),
    "a BOM": (b'\xef\xbb\xbf{"model": "budget-mini", "messages": []}', "model_not_priced"),
    "n as a string": (b'{"model": "budget-mini", "messages": [], "n": "2"}', "bad_request"),
}


@pytest.mark.parametrize("name", UNPRICEABLE)
async def test_a_body_the_proxy_cannot_price_is_refused_before_the_upstream(
    budgeted: Proxy, name: str
) -> None:
    issued = await budgeted.issue_token(budget_usd=5)
    body, code = UNPRICEABLE[name]
    for send in FRAMINGS.values():
        refused(await exchange(budgeted, send(CHAT, issued["token"], body)), 400, code)
    assert budgeted.upstream.requests == []
    await holds_nothing(budgeted, issued["id"])


async def test_a_large_malformed_body_is_refused_before_the_upstream(budgeted: Proxy) -> None:
    issued = await budgeted.issue_token(budget_usd=5)
    body = big_chat("text")[:-2]  # cut off before its last member ends
    for send in FRAMINGS.values():
        refused(await exchange(budgeted, send(CHAT, issued["token"], body)), 400, "bad_request")
    assert budgeted.upstream.requests == []
    await holds_nothing(budgeted, issued["id"])


# -- output caps: whatever the client writes, the upstream cannot produce more than was held ---

BIG = b"1" + b"0" * 30  # beyond any integer the proxy's JSON parser keeps as one


@pytest.mark.parametrize(
    "body",
    [
        small_chat(max_completion_tokens=10)[:-1] + b',"max_completion_tokens":150}',
        small_chat(max_completion_tokens=150)[:-1] + b',"max_completion_tokens":10}',
        small_chat(max_tokens=150, max_completion_tokens=10),
        small_chat(max_tokens=10)[:-1] + b',"max_\\u0074okens":150}',
    ],
    ids=["repeated-rising", "repeated-falling", "two-fields", "escaped-key"],
)
async def test_a_repeated_cap_is_held_at_its_largest(budgeted: Proxy, body: bytes) -> None:
    issued = await budgeted.issue_token(budget_usd=0.001)
    status, headers, answer = await exchange(budgeted, with_length(CHAT, issued["token"], body))
    assert status == 200, answer
    assert budgeted.upstream.last.body == body  # a cap was given: nothing added
    hold = held(headers, 0.001)
    assert hold >= 150 * OUTPUT_NANOUSD
    for cap in caps_any_parser_reads(body):
        assert isinstance(cap, int) and cap * OUTPUT_NANOUSD <= hold
    used = orjson.loads(answer)["usage"]
    assert (
        used["prompt_tokens"] * INPUT_NANOUSD + used["completion_tokens"] * OUTPUT_NANOUSD <= hold
    )
    shown = await settled(budgeted, issued["id"], spent_at_least=0.000001)
    assert shown["spent_usd"] <= 0.001


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (CHAT, small_chat(max_completion_tokens=None)),
        (CHAT, small_chat(max_completion_tokens=None)[:-1] + b',"max_completion_tokens":null}'),
        (
            "/v1/responses",
            orjson.dumps({"model": "budget-mini", "input": "hi", "max_output_tokens": None}),
        ),
        (
            "/v1/completions",
            orjson.dumps({"max_tokens": None, "model": "budget-mini", "prompt": "hi"}),
        ),
    ],
    ids=["chat", "chat-twice", "responses", "completions"],
)
async def test_a_null_cap_cannot_undo_the_cap_the_proxy_adds(
    budgeted: Proxy, path: str, body: bytes
) -> None:
    # The SDKs send null for a cap set to None. The budget affords less than the model's own 200
    # tokens, so the proxy adds a cap: the client's null must not win over it in any parser.
    issued = await budgeted.issue_token(budget_usd=0.0005)
    status, headers, answer = await exchange(budgeted, with_length(path, issued["token"], body))
    assert status == 200, answer
    sent = budgeted.upstream.last
    framed_whole(sent)
    hold = held(headers, 0.0005)
    caps = caps_any_parser_reads(sent.body)
    assert caps and all(isinstance(cap, int) and cap * OUTPUT_NANOUSD <= hold for cap in caps)
    used = orjson.loads(answer)["usage"]
    produced = used.get("completion_tokens", used.get("output_tokens"))
    assert isinstance(caps[0], int) and produced == caps[0] < 200
    shown = await settled(budgeted, issued["id"], spent_at_least=0.000001)
    assert shown["spent_usd"] <= 0.0005


@pytest.mark.parametrize(
    "value",
    [b'"100"', b"100.0", b"1e2", b"100.5", b"true", b"-1", b"0", b"-0", b"[100]", b"1e400", BIG],
    ids=["string", "float", "exponent", "fraction", "bool", "-1", "0", "-0", "list", "inf", "big"],
)
@pytest.mark.parametrize("field", CAP_FIELDS)
async def test_a_cap_that_is_not_a_positive_integer_is_refused(
    budgeted: Proxy, field: str, value: bytes
) -> None:
    # An upstream may read any of these as no cap at all (the fake one does, as llama.cpp reads -1):
    # held as a bound, they would let it answer at length. (The last one is an integer, but no
    # budget affords it anyway.)
    issued = await budgeted.issue_token(budget_usd=0.0005)
    body = small_chat()[:-1] + b',"%s":%s}' % (field.encode(), value)
    answer = await exchange(budgeted, with_length(CHAT, issued["token"], body))
    refused(answer, 400, "bad_request")
    assert budgeted.upstream.requests == []
    await holds_nothing(budgeted, issued["id"])


async def test_a_null_and_a_number_for_one_cap_are_refused(budgeted: Proxy) -> None:
    # A parser keeping the last of the two reads no cap, while the number alone would be held.
    issued = await budgeted.issue_token(budget_usd=0.0005)
    for body in (
        small_chat(max_tokens=20)[:-1] + b',"max_tokens":null}',
        small_chat(max_tokens=None)[:-1] + b',"max_tokens":20}',
    ):
        answer = await exchange(budgeted, with_length(CHAT, issued["token"], body))
        assert "max_tokens" in refused(answer, 400, "bad_request")
    assert budgeted.upstream.requests == []
    await holds_nothing(budgeted, issued["id"])


@pytest.mark.parametrize(
    "body",
    [
        small_chat(max_completion_tokens=10**12),
        small_chat(max_tokens=2**63 - 1),
        small_chat(n=10**6),
        orjson.dumps({"model": "budget-mini", "prompt": "hi", "best_of": 10**6}),
    ],
    ids=["huge-cap", "largest-int64-cap", "many-choices", "best-of"],
)
async def test_a_request_the_budget_cannot_afford_is_refused_before_the_upstream(
    budgeted: Proxy, body: bytes
) -> None:
    issued = await budgeted.issue_token(budget_usd=5)
    path = "/v1/completions" if b'"prompt"' in body else CHAT
    answer = await exchange(budgeted, with_length(path, issued["token"], body))
    refused(answer, 429, "budget_exceeded")
    assert answer[1]["x-should-retry"] == "false"
    assert budgeted.upstream.requests == []
    await holds_nothing(budgeted, issued["id"])


# -- compressed bodies -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"Content_Encoding": "gzip"},
        {"Content_Encoding": "GZIP"},
        {"Content_Encoding": "identity, gzip"},
        {"Content_Encoding": "deflate"},
        {"Content_Encoding": "br"},
    ],
    ids=["gzip", "upper-case", "listed", "deflate", "br"],
)
async def test_a_compressed_body_is_refused_clearly_not_forwarded_unpriced(
    budgeted: Proxy, fields: dict[str, str]
) -> None:
    issued = await budgeted.issue_token(budget_usd=5)
    body = gzip.compress(big_chat("text"))
    for send in FRAMINGS.values():
        answer = await exchange(budgeted, send(CHAT, issued["token"], body, **fields))
        assert "Content-Encoding" in refused(answer, 415, "unsupported_content_encoding")
    assert budgeted.upstream.requests == []
    await holds_nothing(budgeted, issued["id"])


async def test_a_second_content_encoding_line_or_a_dropped_one_is_no_way_around_pricing(
    budgeted: Proxy,
) -> None:
    issued = await budgeted.issue_token(budget_usd=5)
    token = issued["token"]
    body = gzip.compress(small_chat())
    head = with_length(CHAT, token, body, Content_Encoding="identity").removesuffix(body)
    two_lines = head.replace(b"\r\n\r\n", b"\r\nContent-Encoding: gzip\r\n\r\n") + body
    refused(await exchange(budgeted, two_lines), 415, "unsupported_content_encoding")
    # Named in Connection, the header is dropped on the way: the bytes are priced as they are
    # and they are no JSON.
    hidden = with_length(CHAT, token, body, Content_Encoding="gzip", Connection="Content-Encoding")
    refused(await exchange(budgeted, hidden), 400, "model_not_priced")
    assert budgeted.upstream.requests == []
    await holds_nothing(budgeted, issued["id"])
    # Identity is no encoding at all: priced and capped as any other body.
    status, _, _ = await exchange(
        budgeted, with_length(CHAT, token, small_chat(), Content_Encoding="identity")
    )
    assert status == 200
    assert budgeted.upstream.last.body == small_chat()
