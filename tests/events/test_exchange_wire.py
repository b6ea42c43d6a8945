"""The wire form the server queues for its events process, read and lightened in the queue."""

from __future__ import annotations

from dataclasses import fields, replace

import pytest

from llm_proxy.proxy.exchange import (
    Exchange,
    wire_captured_bytes,
    wire_settles,
    wire_without_request_body,
)
from tests.events.events_support import exchange

PROMPT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x" * 5000}]}
ANSWER = b'{"usage": {"prompt_tokens": 12, "completion_tokens": 3}}'


def test_the_wire_form_carries_the_whole_exchange_back() -> None:
    original = replace(exchange(request=PROMPT, response=ANSWER), tpm_limited=True, hold_id="h1")
    again = Exchange.from_wire(original.to_wire())
    assert again.to_wire() == original.to_wire()
    assert again.request_body.getvalue() == original.request_body.getvalue()
    assert (again.hold_id, again.tpm_limited, again.request_bytes_shed) == ("h1", True, 0)


def test_every_field_on_the_wire_comes_back_under_its_own_name() -> None:
    # from_wire is positional: a field added out of to_wire's order would shift the others, which
    # equal defaults would hide. Every field here differs from its default and from the others.
    original = exchange(request=PROMPT, response=ANSWER)
    distinct: dict[str, object] = {}
    for number, field in enumerate(fields(Exchange)):
        value = getattr(original, field.name)
        if isinstance(value, bool):
            distinct[field.name] = not field.default
        elif isinstance(value, int | float) and field.name not in ("started", "started_at"):
            distinct[field.name] = 1000 + number
        elif isinstance(value, str) or value is None:
            distinct[field.name] = f"value-{number}"
    changed = replace(original, **distinct)  # type: ignore[arg-type]
    again = Exchange.from_wire(changed.to_wire())
    server_only = {"answered_whole"}
    for field in fields(Exchange):
        if field.name in server_only:
            assert getattr(again, field.name) == field.default
        elif field.name.endswith("_body"):
            assert getattr(again, field.name).getvalue() == getattr(changed, field.name).getvalue()
        else:
            assert getattr(again, field.name) == getattr(changed, field.name), field.name


def test_the_queue_reads_the_captured_bytes_from_the_wire_form() -> None:
    original = exchange(request=PROMPT, response=ANSWER, request_limit=1000)
    assert wire_captured_bytes(original.to_wire()) == original.captured_bytes == 1000 + len(ANSWER)


@pytest.mark.parametrize(
    ("tpm_limited", "hold_id", "settles"),
    [(False, "", False), (True, "", True), (False, "hold-1", True), (True, "hold-1", True)],
)
def test_the_queue_reads_whether_an_exchange_settles_from_the_wire_form(
    tpm_limited: bool, hold_id: str, settles: bool
) -> None:
    original = replace(exchange(request=PROMPT), tpm_limited=tpm_limited, hold_id=hold_id)
    assert wire_settles(original.to_wire()) is original.settles is settles


def test_a_lightened_wire_form_has_no_request_body_and_says_how_long_it_was() -> None:
    original = replace(exchange(request=PROMPT, response=ANSWER, request_limit=1000), hold_id="h1")
    lightened = Exchange.from_wire(wire_without_request_body(original.to_wire()))

    assert lightened.request_body.getvalue() == b""
    assert (lightened.request_body.limit, lightened.request_body.truncated) == (1000, False)
    assert lightened.request_bytes_shed == 1000
    # Everything usage and settlement need is still there.
    assert lightened.response_body.getvalue() == ANSWER
    assert (lightened.hold_id, lightened.status, lightened.request_id) == (
        "h1",
        200,
        original.request_id,
    )
    assert lightened.ended == original.ended
